"""Each strategy module's pure functions and transform, with and without jit (chex variants), against references
computed independently: closed forms, numpy, brute force. (The same pattern tests a strategy of your own; see the
README's "Testing your own strategy".)"""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clflax.models import progressive
from clflax.strategies import agem
from clflax.strategies import der
from clflax.strategies import ewc
from clflax.strategies import gem
from clflax.strategies import l2
from clflax.strategies import lwf
from clflax.strategies import mas
from clflax.strategies import memory
from clflax.strategies import mer
from clflax.strategies import packnet
from clflax.strategies import si
from clflax.strategies import tagem

_RNG = np.random.default_rng(0)
_PARAMS = {'w': jnp.asarray(_RNG.normal(size=(3, 2)), jnp.float32), 'b': jnp.asarray(_RNG.normal(size=2), jnp.float32)}
_GRADS = jax.tree.map(lambda p: jnp.asarray(_RNG.normal(size=p.shape), jnp.float32), _PARAMS)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _updater(tx):
  """tx.update of the module's gradients at the module's parameters, as a function of the state (to jit)."""
  return lambda state: tx.update(_GRADS, state, _PARAMS)


class PureFunctionsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_agem_projection_is_the_closed_form(self):
    g, r = _flat(_GRADS), _flat(jax.tree.map(lambda x: -x + 0.1, _GRADS))
    assert g @ r < 0  # A conflict: projected onto the half-space.
    want = g - (g @ r) / (r @ r) * r
    got = self.variant(agem.project)(_GRADS, jax.tree.map(lambda x: -x + 0.1, _GRADS))
    np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-6)
    same = self.variant(agem.project)(_GRADS, _GRADS)  # No conflict: unchanged.
    chex.assert_trees_all_close(same, _GRADS)
    chex.assert_trees_all_equal_dtypes(got, _GRADS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ewc_fisher_penalty_and_transform(self):
    x = jnp.asarray(_RNG.normal(size=(5, 3)), jnp.float32)
    loss = lambda p, ex: jnp.sum(jnp.tanh(ex @ p['w'] + p['b']) ** 2)  # noqa: E731

    def per_example_loop():  # The definition, one example at a time.
      grads = [jax.grad(loss)(_PARAMS, x[i]) for i in range(5)]
      return jax.tree.map(lambda *g: np.mean(np.square(np.stack(g)), 0), *grads)

    fisher = self.variant(lambda p, b: ewc.fisher_diagonal(loss, p, b, chunk_size=2))(_PARAMS, x)
    chex.assert_trees_all_close(fisher, per_example_loop(), rtol=1e-5, atol=1e-7)
    anchor = jax.tree.map(lambda p: p + 0.5, _PARAMS)
    want = 0.5 * sum(np.sum(f * (p - a) ** 2) for f, p, a in zip(
        jax.tree.leaves(fisher), jax.tree.leaves(_PARAMS), jax.tree.leaves(anchor)))
    np.testing.assert_allclose(self.variant(ewc.penalty)(_PARAMS, anchor, fisher), want, rtol=1e-5)
    tx = ewc.ewc(3.0)
    state = ewc.consolidate(tx.init(_PARAMS), anchor, fisher)
    updates, _ = self.variant(_updater(tx))(state)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g, f, p, a: g + 3.0 * f * (p - a), _GRADS, fisher,
                                                      _PARAMS, anchor), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_si_path_integral_and_importance(self):
    tx = si.si(strength=2.0, damping=0.1)
    state = tx.init(_PARAMS)
    params_1 = jax.tree.map(lambda p, g: p - 0.1 * g, _PARAMS, _GRADS)
    _, state = self.variant(_updater(tx))(state)
    state = si.consolidate(state, params_1)
    delta = jax.tree.map(lambda a, b: a - b, params_1, _PARAMS)
    omega = jax.tree.map(lambda g, d: -g * d, _GRADS, delta)
    chex.assert_trees_all_close(state.importance, jax.tree.map(lambda w, d: w / (d ** 2 + 0.1), omega, delta),
                                rtol=1e-5)
    chex.assert_trees_all_close(state.anchor, params_1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mas_importance_is_the_mean_absolute_gradient_of_the_squared_output_norm(self):
    x = jnp.asarray(_RNG.normal(size=(4, 3)), jnp.float32)
    output = lambda p, ex: ex @ p['w'] + p['b']  # noqa: E731
    got = self.variant(lambda p, b: mas.importance(output, p, b))(_PARAMS, x)
    grads = [jax.grad(lambda p, ex=x[i]: jnp.sum(output(p, ex) ** 2))(_PARAMS) for i in range(4)]
    chex.assert_trees_all_close(got, jax.tree.map(lambda *g: np.mean(np.abs(np.stack(g)), 0), *grads), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_l2_pulls_to_the_anchor_only_once_consolidated(self):
    tx = l2.l2(0.5)
    fresh, _ = self.variant(_updater(tx))(tx.init(_PARAMS))
    chex.assert_trees_all_close(fresh, _GRADS)
    anchor = jax.tree.map(jnp.zeros_like, _PARAMS)
    pulled, _ = self.variant(_updater(tx))(l2.consolidate(tx.init(_PARAMS), anchor))
    chex.assert_trees_all_close(pulled, jax.tree.map(lambda g, p: g + 0.5 * p, _GRADS, _PARAMS), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gem_projection_matches_a_brute_force_qp(self):
    task = jax.tree.map(lambda g: jnp.stack([-g + 0.3, 0.5 * g]), _GRADS)  # One violated, one satisfied.
    got = self.variant(lambda g, t: gem.project(g, t, margin=0.0))(_GRADS, task)
    g, rows = _flat(_GRADS), np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], task)) for i in range(2)])
    best = None  # min ||z - g||^2 s.t. rows @ z >= 0: the best KKT point over all active sets.
    for active in itertools.chain.from_iterable(itertools.combinations(range(2), r) for r in range(3)):
      a = rows[list(active)]
      z = g - a.T @ np.linalg.solve(a @ a.T, a @ g) if active else g
      if np.all(rows @ z >= -1e-6) and (best is None or np.sum((z - g) ** 2) < np.sum((best - g) ** 2)):
        best = z
    np.testing.assert_allclose(_flat(got), best, rtol=1e-4, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_memory_fills_in_order_then_samples_without_replacement(self):
    example = {'x': jnp.zeros((2,))}
    buffer = memory.init(6, example)
    batch = {'x': jnp.arange(8.).reshape(4, 2)}
    buffer = self.variant(memory.add)(buffer, batch, jax.random.PRNGKey(0))  # 4 <= capacity: all stored in order.
    np.testing.assert_array_equal(buffer.data['x'][:4], np.arange(8.).reshape(4, 2))
    assert int(buffer.size) == 4 and int(buffer.seen) == 4
    drawn = self.variant(lambda b, k: memory.sample(b, k, 4))(buffer, jax.random.PRNGKey(1))
    assert sorted(np.asarray(drawn['x'][:, 0]).tolist()) == [0., 2., 4., 6.]  # Each stored example once.

  @chex.variants(with_jit=True, without_jit=True)
  def test_der_and_lwf_losses_are_their_closed_forms(self):
    z, stored = jnp.asarray(_RNG.normal(size=(3, 4)), jnp.float32), jnp.asarray(_RNG.normal(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(self.variant(der.logit_loss)(z, stored), np.mean((z - stored) ** 2), rtol=1e-6)
    labels = jnp.asarray([0, 3, 1])
    log_p = np.asarray(jax.nn.log_softmax(z))
    np.testing.assert_allclose(self.variant(der.label_loss)(z, labels), -np.mean(log_p[np.arange(3), labels]),
                               rtol=1e-5)
    t = 2.0
    p, log_q = np.asarray(jax.nn.softmax(stored / t)), np.asarray(jax.nn.log_softmax(z / t))
    want = t ** 2 * np.mean(np.sum(p * (np.log(p) - log_q), -1))
    np.testing.assert_allclose(self.variant(lambda a, b: lwf.distillation_loss(a, b, t))(z, stored), want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tagem_opens_clusters_then_joins_the_nearest(self):
    mem = tagem.init(1, 2, 2, {'x': jnp.zeros((1,))})
    insert = self.variant(lambda m, v: tagem.insert(m, {'x': jnp.asarray([v])}, 0))
    for value in (0.0, 10.0, 9.0):  # Two clusters opened, then 9 joins the one at 10.
      mem = insert(mem, value)
    np.testing.assert_array_equal(np.asarray(mem.written[0]), [1, 2])
    np.testing.assert_allclose(np.asarray(tagem.centroids(mem)[0]), [[0.0], [9.5]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_packnet_prunes_the_smallest_fraction_and_freezes_the_rest(self):
    w = jnp.asarray([[0.1, -3.0], [2.0, -0.2], [0.5, 4.0]])
    owners = packnet.init_owners({'w': w})
    owners = packnet.claim(owners, 0)
    params, owners = self.variant(lambda p, o: packnet.prune(p, o, 0, 0.5))({'w': w}, owners)
    np.testing.assert_array_equal(np.asarray(params['w']) == 0, np.abs(np.asarray(w)) < 1)  # The 3 smallest.
    tx = packnet.packnet()
    state = packnet.start_task(packnet.PackNetState(owners, jnp.zeros((), jnp.int32)), 1)
    updates, _ = self.variant(lambda u, s: tx.update(u, s))({'w': jnp.ones_like(w)}, state)
    np.testing.assert_array_equal(np.asarray(updates['w']), np.abs(np.asarray(w)) < 1)  # Only the freed weights.

  @chex.variants(with_jit=True, without_jit=True)
  def test_mer_with_unit_rates_is_plain_sgd_through_its_batches(self):
    loss = lambda p, b: jnp.sum((b @ p['w'] + p['b']) ** 2)  # noqa: E731
    batches = jnp.asarray(_RNG.normal(size=(2, 3, 1, 3)), jnp.float32)  # s=2 batches of k=3 steps.
    got = self.variant(lambda p, b: mer.mer_step(p, loss, b, 0.01, 1.0, 1.0))(_PARAMS, batches)
    want = _PARAMS
    for i, j in itertools.product(range(2), range(3)):
      want = jax.tree.map(lambda p, g: p - 0.01 * g, want, jax.grad(loss)(want, batches[i, j]))
    chex.assert_trees_all_close(got, want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_progressive_trains_its_column_only(self):
    params = {'column_0': {'w': jnp.ones(2)}, 'column_1': {'w': jnp.ones(2)}, 'shared': jnp.ones(1)}
    tx = optax.chain(optax.sgd(1.0), progressive.train_column_only(1))
    updates, _ = self.variant(lambda u, s: tx.update(u, s, params))(params, tx.init(params))
    chex.assert_trees_all_close(updates, {'column_0': {'w': jnp.zeros(2)}, 'column_1': {'w': -jnp.ones(2)},
                                          'shared': -jnp.ones(1)})
