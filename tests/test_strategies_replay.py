"""Replay buffers: reservoir statistics, balanced reservoir, sampling, append."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.strategies import replay

# Upper 0.999 quantile of chi-square with 14 degrees of freedom (tables).
CHI2_14_999 = 36.12


# Jitted once per shape: cheaper than op-by-op dispatch on 2 cores.
_add = jax.jit(replay.add)
_append = jax.jit(replay.append)
_sample = jax.jit(replay.sample, static_argnums=2)
_add_balanced = jax.jit(replay.add_balanced)


def _ids(n, start=0):
  return {'id': jnp.arange(start, start + n, dtype=jnp.int32)}


def _stored_ids(buffer):
  ids = np.asarray(buffer.data['id'])
  return ids[np.asarray(replay.valid_slots(buffer))]


def test_fill_phase_is_in_order_and_counts():
  buf = replay.init(5, {'id': jnp.zeros((), jnp.int32)})
  buf = _add(buf, _ids(3), jax.random.key(0))
  assert int(buf.size) == 3 and int(buf.seen) == 3
  np.testing.assert_array_equal(buf.data['id'], [0, 1, 2, 0, 0])
  valid = jnp.array([True, False, True])
  buf = _add(buf, _ids(3, 10), jax.random.key(1), valid)
  assert int(buf.size) == 5 and int(buf.seen) == 5
  np.testing.assert_array_equal(buf.data['id'], [0, 1, 2, 10, 12])


def _reservoir_trials(capacity, batches, trials, seed=0):
  """Stored ids per trial after streaming the batches (vmapped over keys)."""
  def run(key):
    buf = replay.init(capacity, {'id': jnp.zeros((), jnp.int32)})
    start = 0
    for b, k in zip(batches, jax.random.split(key, len(batches))):
      buf = replay.add(buf, _ids(b, start), k)
      start += b
    return buf.data['id'], buf.size, buf.seen
  keys = jax.random.split(jax.random.key(seed), trials)
  return jax.jit(jax.vmap(run))(keys)


def test_reservoir_subsets_uniform_chi_square():
  # After 6 examples in 2 calls with capacity 2, all 15 pairs equally likely.
  trials = 3000
  ids, size, seen = _reservoir_trials(2, (4, 2), trials)
  assert np.all(size == 2) and np.all(seen == 6)
  pairs = [tuple(sorted(row)) for row in np.asarray(ids)]
  assert all(a != b for a, b in pairs)
  counts = np.array([pairs.count(p) for p in itertools.combinations(range(6), 2)])
  assert counts.sum() == trials
  expected = trials / 15
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < CHI2_14_999, (chi2, counts)


def test_reservoir_inclusion_probability_binomial():
  capacity, n, trials = 5, 20, 2000
  ids, size, seen = _reservoir_trials(capacity, (8, 8, 4), trials, seed=1)
  assert np.all(size == capacity) and np.all(seen == n)
  counts = np.bincount(np.asarray(ids).ravel(), minlength=n)
  p = capacity / n
  sd = np.sqrt(trials * p * (1 - p))
  assert np.all(np.abs(counts - trials * p) < 4.5 * sd), counts


def test_balanced_reservoir_per_class():
  labels = jnp.array([0, 1, 0, 2, 0, 0, 1, -1, 0, 2, 1, 0])
  per_class, trials = 2, 2000
  example = {'id': jnp.zeros((), jnp.int32), 'label': jnp.zeros((), jnp.int32)}

  def run(key):
    buf = replay.init_balanced(3, per_class, example)
    k1, k2 = jax.random.split(key)
    batch = {'id': jnp.arange(12), 'label': labels}
    buf = replay.add_balanced(buf, jax.tree.map(lambda x: x[:5], batch),
                              labels[:5], k1)
    return replay.add_balanced(buf, jax.tree.map(lambda x: x[5:], batch),
                               labels[5:], k2)

  bufs = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(2), trials))
  np.testing.assert_array_equal(bufs.seen, np.tile([6, 3, 2], (trials, 1)))
  np.testing.assert_array_equal(bufs.size, np.tile([2, 2, 2], (trials, 1)))
  # Class c owns slots [2c, 2c + 2): only its own examples, never the -1 one.
  slot_class = np.repeat(np.arange(3), per_class)
  np.testing.assert_array_equal(bufs.data['label'],
                                np.tile(slot_class, (trials, 1)))
  counts = np.bincount(np.asarray(bufs.data['id']).ravel(), minlength=12)
  assert counts[7] == 0
  labels_np = np.asarray(labels)
  for c, seen_c in enumerate([6, 3, 2]):
    p = min(1.0, per_class / seen_c)
    sd = np.sqrt(trials * p * (1 - p)) + 1e-9
    got = counts[labels_np == c]
    assert np.all(np.abs(got - trials * p) <= 4.5 * sd), (c, got)


def test_sample_uniform_without_replacement():
  buf = replay.init(8, {'id': jnp.zeros((), jnp.int32)})
  buf = _append(buf, _ids(5, 10))
  trials, n = 3000, 3
  draws = jax.jit(jax.vmap(lambda k: replay.sample(buf, k, n)['id']))(
      jax.random.split(jax.random.key(3), trials))
  draws = np.asarray(draws)
  assert np.all((draws >= 10) & (draws < 15))
  assert all(len(set(row)) == n for row in draws)  # No repeats when n <= size.
  counts = np.bincount(draws.ravel() - 10, minlength=5)
  p = n / 5
  assert np.all(np.abs(counts - trials * p) < 4.5 * np.sqrt(trials * p * (1 - p)))


def test_sample_more_than_stored_and_empty():
  buf = replay.init(8, {'id': jnp.zeros((), jnp.int32)})
  empty = _sample(buf, jax.random.key(0), 4)
  np.testing.assert_array_equal(empty['id'], np.zeros(4))
  assert int(replay.size(buf)) == 0
  buf = _append(buf, _ids(2, 7))
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: replay.sample(buf, k, 12)['id']))(
          jax.random.split(jax.random.key(4), 200)))
  assert draws.shape == (200, 12)
  assert set(np.unique(draws)) == {7, 8}  # With replacement, valid slots only.
  assert abs(np.mean(draws == 7) - 0.5) < 0.05


def test_sample_balanced_only_valid_slots():
  buf = replay.init_balanced(3, 4, {'id': jnp.zeros((), jnp.int32)})
  buf = _add_balanced(buf, _ids(3, 1), jnp.array([0, 2, 2]),
                            jax.random.key(0))
  assert int(replay.size(buf)) == 3
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: replay.sample(buf, k, 3)['id']))(
          jax.random.split(jax.random.key(5), 100)))
  assert all(sorted(row) == [1, 2, 3] for row in draws)

  # With replacement across the gaps between classes' slots: stored ids only, each about a third of the draws.
  many = np.asarray(jax.jit(jax.vmap(lambda k: replay.sample(buf, k, 12)['id']))(
      jax.random.split(jax.random.key(6), 300)))
  assert set(np.unique(many)) == {1, 2, 3}
  assert all(abs(np.mean(many == i) - 1 / 3) < 0.03 for i in (1, 2, 3))


def test_append_ring_order():
  buf = replay.init(4, {'id': jnp.zeros((), jnp.int32)})
  buf = _append(buf, _ids(3))
  buf = _append(buf, _ids(3, 3))
  np.testing.assert_array_equal(buf.data['id'], [4, 5, 2, 3])
  assert int(buf.size) == 4 and int(buf.seen) == 6
  big = _append(replay.init(4, {'id': jnp.zeros((), jnp.int32)}), _ids(6))
  np.testing.assert_array_equal(big.data['id'], [4, 5, 2, 3])  # Last 4 win.


@pytest.mark.parametrize('example', [
    {'image': np.zeros((4, 4, 3), np.uint8), 'mask': np.zeros((4, 4), np.uint8)},
    (np.zeros((4, 4, 3), np.float32), np.zeros((5, 4), np.float32),
     np.zeros((5,), np.int32)),
    (np.zeros((4, 4, 3), np.float32), np.int32(0)),
])
def test_any_example_structure(example):
  buf = replay.init(3, example)
  rng = np.random.default_rng(0)
  batch = jax.tree.map(
      lambda x: rng.integers(1, 9, size=(5,) + np.shape(x)).astype(x.dtype),
      example)
  buf = _add(buf, batch, jax.random.key(0))
  out = _sample(buf, jax.random.key(1), 2)
  for leaf, ex in zip(jax.tree.leaves(out), jax.tree.leaves(example)):
    assert leaf.shape == (2,) + np.shape(ex) and leaf.dtype == ex.dtype
    assert np.all(np.asarray(leaf) >= 1)  # Real examples, not init zeros.


def test_bad_input():
  with pytest.raises(ValueError, match='capacity'):
    replay.init(0, {'id': jnp.zeros(())})
  buf = replay.init(3, {'id': jnp.zeros((2,))})
  with pytest.raises(ValueError, match='shape'):
    replay.add(buf, {'id': jnp.zeros((4, 3))}, jax.random.key(0))
  with pytest.raises(ValueError, match='valid'):
    replay.add(buf, {'id': jnp.zeros((4, 2))}, jax.random.key(0),
               valid=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match='structure'):
    replay.append(buf, {'x': jnp.zeros((4, 2))})
  with pytest.raises(ValueError, match='labels'):
    replay.add_balanced(replay.init_balanced(2, 2, {'id': jnp.zeros(())}),
                        {'id': jnp.zeros((3,))}, jnp.zeros((2,), jnp.int32),
                        jax.random.key(0))
