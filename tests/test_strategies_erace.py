"""ER-ACE: the asymmetric cross-entropy against numpy, and the trainer's step against a hand-written loss."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clflax.strategies import erace
from clflax.strategies import memory


def _ce(logits, labels, keep=None):
  """numpy cross-entropy, with the classes outside `keep` removed from the softmax."""
  logits = np.asarray(logits, np.float64)
  if keep is not None:
    logits = np.where(keep, logits, -np.inf)
  log_p = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return -np.mean(log_p[np.arange(len(labels)), labels])


class EraceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_incoming_loss_masks_the_classes_seen_before_that_the_batch_lacks(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6)).astype(np.float32)
    labels = np.asarray([4, 5, 4, 5, 0])
    valid = np.asarray([True, True, True, True, False])  # The padding row's class 0 is not "present".
    seen = np.asarray([True, True, True, False, False, False])  # Classes 0-2 are in memory.
    keep = np.asarray([False, False, False, True, True, True])  # Absent-and-seen out; present and unseen in.
    got = self.variant(erace.incoming_loss)(logits, labels, valid, seen)
    np.testing.assert_allclose(got, _ce(logits[:4], labels[:4], keep), rtol=1e-5)
    nothing_seen = self.variant(erace.incoming_loss)(logits, labels, valid, np.zeros(6, bool))
    np.testing.assert_allclose(nothing_seen, _ce(logits[:4], labels[:4]), rtol=1e-5)  # Plain CE: first task.

  @chex.variants(with_jit=True, without_jit=True)
  def test_seen_classes_are_those_stored(self):
    buffer = memory.init(4, {'image': jnp.zeros(2), 'label': jnp.zeros((), jnp.int32)})
    buffer = memory.append(buffer, {'image': jnp.zeros((2, 2)), 'label': jnp.asarray([3, 1], jnp.int32)})
    np.testing.assert_array_equal(self.variant(lambda b: erace.seen_classes(b, 5))(buffer),
                                  [False, True, False, True, False])

  def test_trainer_step_is_the_asymmetric_loss_plus_the_memory_loss(self):
    from clflax.configs import mnist  # pylint: disable=g-import-not-at-top
    from clflax.trainer import setup  # pylint: disable=g-import-not-at-top
    from clflax.trainer import steps  # pylint: disable=g-import-not-at-top
    config = mnist.split('erace,smoke')
    config.model.hidden = (8,)
    config.strategy.erace.weight, config.strategy.erace.batch = 0.7, 4
    model = setup.build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))['params']
    rng = np.random.default_rng(1)
    batch = {'image': rng.uniform(size=(4, 784)).astype(np.float32), 'label': np.asarray([2, 3, 3, 2], np.int32),
             'valid': np.ones(4, bool)}
    # A memory of copies of ONE example of class 0: every memory batch is 4 copies of it; classes seen: {0}.
    stored = {'image': rng.uniform(size=784).astype(np.float32), 'label': np.int32(0), 'valid': np.bool_(True)}
    buffer = memory.init(20, jax.tree.map(jnp.asarray, stored))
    buffer = memory.append(buffer, {k: np.stack([v] * 20) for k, v in stored.items()})
    lr = 0.1
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, optax.sgd(lr).init(params), jax.random.PRNGKey(2))
    new, metrics = steps.train_step(state, jax.tree.map(jnp.asarray, batch), steps.Context({memory.SHARED: buffer}, {}),
                                    model=model, tx=optax.sgd(lr), task='task2', earlier=('task1',), config=config)
    keep = np.ones(10, bool)
    keep[0] = False  # Seen before (in memory), absent from the incoming batch.

    def loss(p):
      logits = model.apply({'params': p}, batch['image'])
      incoming = -jnp.mean(jax.nn.log_softmax(jnp.where(keep, logits, -1e9))[jnp.arange(4), batch['label']])
      mem_logits = model.apply({'params': p}, np.stack([stored['image']] * 4))
      return incoming - 0.7 * jnp.mean(jax.nn.log_softmax(mem_logits)[:, 0])

    want = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))
    chex.assert_trees_all_close(new.params, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics['total'], loss(params), rtol=1e-5)
