"""TA-A-GEM clustering memory against a plain-Python run of the same procedure; its insertion in place."""
import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clflax.data import classic
from clflax.models import classic as classic_models
from clflax.trainer import steps
from clflax.strategies import registry
from clflax.strategies import tagem

POOLS, Q, P = 3, 3, 2


class _Reference:
  """Lists of FIFO clusters per pool, nearest mean in float64 (the paper's rule)."""

  def __init__(self):
    self.pools = collections.defaultdict(list)  # label -> [deque of (id, x)].

  def insert(self, ident, x, label):
    if not 0 <= label < POOLS:
      return
    clusters = self.pools[label]
    if len(clusters) < Q:
      clusters.append(collections.deque([(ident, x)]))
      return
    means = [np.mean([m for _, m in c], axis=0) for c in clusters]
    best = int(np.argmin([np.sum((x - m) ** 2) for m in means]))
    clusters[best].append((ident, x))
    if len(clusters[best]) > P:
      clusters[best].popleft()  # Oldest member out.


def _stream(n, seed):
  """2-D points around 5 centres per label; a few labels out of range."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, POOLS, size=n)
  labels[::17] = POOLS  # Skipped: no such pool.
  centres = rng.normal(scale=4.0, size=(POOLS + 1, 5, 2))
  which = rng.integers(0, 5, size=n)
  x = centres[labels, which] + 0.3 * rng.normal(size=(n, 2))
  return x.astype(np.float32), labels.astype(np.int32)


@jax.jit
def _run(memory, xs, ids, labels):
  def step(mem, inputs):
    x, ident, label = inputs
    return tagem.insert(mem, {'x': x, 'id': ident}, label, feature=x), None
  memory, _ = jax.lax.scan(step, memory, (xs, ids, labels))
  return memory


def _example():
  return {'x': jnp.zeros((2,), jnp.float32), 'id': jnp.zeros((), jnp.int32)}


def test_online_clustering_matches_python_reference():
  n = 80
  xs, labels = _stream(n, seed=0)
  ids = np.arange(n, dtype=np.int32)
  memory = _run(tagem.init(POOLS, Q, P, _example(), feature_dim=2), xs, ids,
                labels)
  ref = _Reference()
  for i in range(n):
    ref.insert(i, xs[i].astype(np.float64), labels[i])

  assert int(memory.seen) == n
  written = np.asarray(memory.written)
  stored = np.asarray(memory.data['id'])
  evictions = 0
  for pool in range(POOLS):
    clusters = ref.pools[pool]
    assert int(memory.clusters[pool]) == len(clusters)
    for c, members in enumerate(clusters):
      count = min(written[pool, c], P)
      evictions += max(written[pool, c] - P, 0)
      assert sorted(stored[pool, c, :count]) == sorted(i for i, _ in members)
      np.testing.assert_allclose(
          tagem.centroids(memory)[pool, c],
          np.mean([x for _, x in members], axis=0), rtol=1e-5, atol=1e-5)
  assert evictions > 10  # The FIFO rule was exercised.
  assert int(tagem.size(memory)) == sum(
      len(c) for cs in ref.pools.values() for c in cs)


def test_default_feature_is_the_flattened_example():
  xs, labels = _stream(30, seed=1)

  @jax.jit
  def both(memories, x, label):
    default, explicit = memories
    return (tagem.insert(default, {'x': x}, label),
            tagem.insert(explicit, {'x': x}, label, x))
  memory = tagem.init(POOLS, Q, P, {'x': jnp.zeros((2,))})
  memories = (memory, memory)
  for x, label in zip(xs, labels):
    memories = both(memories, x, label)
  default, explicit = memories
  np.testing.assert_array_equal(default.data['x'], explicit.data['x'])
  np.testing.assert_array_equal(default.written, explicit.written)


def test_add_picks_one_valid_example_uniformly():
  example = {'id': jnp.zeros((), jnp.int32)}
  batch = {'id': jnp.arange(4, dtype=jnp.int32)}
  labels = jnp.zeros(4, jnp.int32)
  valid = jnp.array([True, False, True, True])

  def picked(key):
    mem = tagem.add(tagem.init(1, 1, 1, example), batch, labels, key,
                    valid=valid)
    return mem.data['id'][0, 0, 0], tagem.size(mem)
  ids, sizes = jax.jit(jax.vmap(picked))(jax.random.split(jax.random.key(0),
                                                          3000))
  assert np.all(sizes == 1)
  counts = np.bincount(np.asarray(ids), minlength=4)
  assert counts[1] == 0
  # Chi-square, 2 degrees of freedom, 0.999 quantile 13.82.
  expected = 1000.0
  assert np.sum((counts[[0, 2, 3]] - expected) ** 2 / expected) < 13.82

  none = tagem.add(tagem.init(1, 1, 1, example), batch, labels,
                   jax.random.key(1), valid=jnp.zeros(4, bool))
  assert int(tagem.size(none)) == 0 and int(none.seen) == 1


def test_sample_draws_stored_examples_with_their_pools():
  n = 80  # As above: `_run` is already compiled for it.
  xs, labels = _stream(n, seed=2)
  memory = _run(tagem.init(POOLS, Q, P, _example(), feature_dim=2), xs,
                np.arange(n, dtype=np.int32), labels)
  stored = int(tagem.size(memory))
  sample = jax.jit(tagem.sample, static_argnums=2)
  batch, pools = sample(memory, jax.random.key(0), stored)
  ids = np.asarray(batch['id'])
  assert len(set(ids.tolist())) == stored  # All of them, no repeats.
  np.testing.assert_array_equal(np.asarray(pools), labels[ids])
  np.testing.assert_array_equal(np.asarray(batch['x']), xs[ids])
  # More than stored: with replacement, still only stored examples.
  batch, _ = sample(memory, jax.random.key(1), 2 * POOLS * Q * P)
  valid_ids = set(np.asarray(memory.data['id']).reshape(-1)[
      np.asarray(tagem.valid_slots(memory))].tolist())
  assert set(np.asarray(batch['id']).tolist()) <= valid_ids
  # ...and uniformly over them: 200 draws per stored example, counts within 4 binomial standard deviations.
  draws = np.asarray(jax.jit(tagem.sample, static_argnums=2)(memory, jax.random.key(2), 200 * stored)[0]['id'])
  counts = np.array([np.sum(draws == i) for i in sorted(valid_ids)])
  assert counts.sum() == 200 * stored
  assert np.all(np.abs(counts - 200) < 4 * np.sqrt(200 * (1 - 1 / stored))), counts


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='Q must be a positive int'):
    tagem.init(2, 0, 3, _example())
  memory = tagem.init(2, 2, 2, _example(), feature_dim=2)
  with pytest.raises(ValueError, match='feature must have shape'):
    tagem.insert(memory, {'x': jnp.ones(2), 'id': jnp.int32(0)}, 0,
                 jnp.ones(3))
  with pytest.raises(ValueError, match='does not match the memory example'):
    tagem.insert(memory, {'x': jnp.ones(3), 'id': jnp.int32(0)}, 0)
  with pytest.raises(ValueError, match='labels must be'):
    tagem.add(memory, {'x': jnp.ones((4, 2)), 'id': jnp.zeros(4, jnp.int32)},
              jnp.zeros(3, jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match='n must be a positive int'):
    tagem.sample(memory, jax.random.key(0), 0)


def test_transform_projects_like_agem_and_stores_one_example_per_update():
  example = {'x': jnp.zeros(2), 'label': jnp.zeros((), jnp.int32)}
  tx = tagem.tagem(POOLS, Q, P, example)
  state = tx.init({'w': jnp.zeros(2)})
  batch = {'x': jnp.asarray([[1., 2.], [3., 4.], [5., 6.], [7., 8.]]), 'label': jnp.asarray([0, 1, 2, 0])}
  valid = jnp.asarray([True, True, False, True])
  g, conflicting = {'w': jnp.asarray([1., 0.])}, {'w': jnp.asarray([-1., 1.])}
  updates, state = tx.update(g, state, None, ref_grads=conflicting,
                             memory_batch=(batch, batch['label'], jax.random.PRNGKey(3), valid))
  # <g, r> = -1 < 0: g - (<g, r> / <r, r>) r = (1, 0) + 0.5 (-1, 1).
  np.testing.assert_allclose(updates['w'], [0.5, 0.5], rtol=1e-6)
  assert int(tagem.size(state.memory)) == 1
  stored = state.memory.data['x'].reshape(-1, 2)[np.asarray(tagem.valid_slots(state.memory))][0]
  row = [i for i in range(4) if np.allclose(batch['x'][i], stored)]
  assert row and bool(valid[row[0]])  # One of the valid examples...
  pool = int(np.argmax(np.asarray(state.memory.clusters)))
  assert pool == int(batch['label'][row[0]])  # ...in the pool of its label.
  agreeing = {'w': jnp.asarray([1., 1.])}
  updates, state = tx.update(g, state, None, ref_grads=agreeing,
                             memory_batch=(batch, batch['label'], jax.random.PRNGKey(4), jnp.zeros(4, bool)))
  np.testing.assert_allclose(updates['w'], [1., 0.])  # No conflict: unchanged.
  assert int(tagem.size(state.memory)) == 1  # No valid example offered: nothing stored.


def test_the_insertion_flag_is_true_for_any_gradient_value():
  for value in (0.0, -2.5, np.inf, -np.inf, np.nan):
    assert bool(jax.jit(tagem._computed)({'w': jnp.full((2,), value)}))  # pylint: disable=protected-access
  assert bool(tagem._computed({'w': jnp.zeros((0,))}))  # pylint: disable=protected-access


def test_a_scanned_train_step_inserts_into_the_memory_in_place():
  """The speed guard: the compiled epoch (the trainer's `lax.scan` of train steps) holds no copy of the memory's
  examples. The sample for the reference gradient and the insertion both touch them; unordered, XLA copied the
  whole memory twice per step (4,250 x 784 floats on Permuted MNIST)."""
  dim, pools, q, p = 6, 3, 4, 8
  strategy = registry.default_config()
  strategy.names = ('tagem',)
  strategy.tagem.pools, strategy.tagem.clusters, strategy.tagem.per_cluster, strategy.tagem.ref_batch = pools, q, p, 4
  config = ml_collections.ConfigDict({'tasks': ('task1',), 'strategy': strategy,
                                      'train': {'loss_weights': {'task1': 1.0}, 'balance_finetune_steps': 0,
                                                'joint': False}})
  model = classic_models.ClassicNet(hidden=(5,), num_classes=pools)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, dim)))['params']
  example = {'image': jnp.zeros((dim,)), 'label': jnp.zeros((), jnp.int32)}
  tx = registry.build_tx(strategy, optax.sgd(0.1), example=example)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  source = {'image': jnp.asarray(rng.normal(size=(20, 2, dim)), jnp.float32),
            'label': jnp.asarray(rng.integers(0, pools, (20, 2)), jnp.int32)}

  def batch_fn(src, task_id, epoch, i):
    del task_id, epoch
    return {'image': src['image'][i], 'label': src['label'][i], 'valid': jnp.ones((2,), bool)}

  epoch = steps.jit_scan_epoch(model, tx, 'task1', (), config, batch_fn, 20)
  hlo = epoch.lower(state, steps.Context({}, {}), source, 0, 0).compile().as_text()
  for shape in (f'f32[{pools},{q},{p},{dim}]', f's32[{pools},{q},{p}]'):  # Images and labels.
    copies = [line for line in hlo.splitlines() if f'{shape}{{' in line and ' copy(' in line]
    assert not copies, copies
  final, _ = epoch(state, steps.Context({}, {}), source, 0, 0)  # Still stores one example per step.
  assert int(tagem.size(registry.find_state(final.opt_state, tagem.TagemState).memory)) == 20
