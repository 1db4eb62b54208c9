"""Permuted / Rotated / Split MNIST task sequences, checked with NumPy and PIL references."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from clflax.data import benchmarks


def _fake_mnist(n_train=600, n_test=200, seed=0):
  rng = np.random.default_rng(seed)
  return {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n).astype(np.int32))
          for split, n in (('train', n_train), ('test', n_test))}


def test_permutations_fixed_by_seed_and_distinct_per_task():
  perms = benchmarks.permutations(20, seed=1)
  assert perms.shape == (20, 784) and perms.dtype == np.int32
  assert all(sorted(p) == list(range(784)) for p in perms)
  np.testing.assert_array_equal(perms, benchmarks.permutations(20, seed=1))
  assert not np.array_equal(perms, benchmarks.permutations(20, seed=2))
  assert len({p.tobytes() for p in perms}) == 20


def test_rotate_against_rot90_and_pil():
  x = _fake_mnist()['train'][0][:3]
  np.testing.assert_allclose(benchmarks.rotate(x, 90.), np.rot90(x, axes=(1, 2)), atol=1e-3)
  np.testing.assert_allclose(benchmarks.rotate(x, 0.), x, atol=1e-4)
  digit = np.zeros((28, 28), np.uint8)
  digit[6:22, 12:16] = 255  # A bar, rotated 30 degrees counter-clockwise like PIL does.
  want = np.asarray(Image.fromarray(digit).rotate(30, resample=Image.BILINEAR), np.float32)
  got = np.asarray(benchmarks.rotate(digit, 30.))
  assert np.abs(got - want).mean() < 2. and np.abs(got - want).max() < 40.


def test_permuted_task_inputs_match_numpy_and_scan_over_tasks():
  data = _fake_mnist()
  seq = benchmarks.make_task_sequence(data, 'permuted', 4, seed=0, examples_per_task=50)
  assert seq.train.index.shape == (4, 50) and seq.test.index.shape == (4, 200)
  rows = seq.train.index[2, :5]
  want = seq.images[rows].reshape(5, 784)[:, seq.perms[2]] / 255.
  np.testing.assert_allclose(jax.jit(benchmarks.task_inputs)(seq, 2, rows), want, atol=1e-6)
  np.testing.assert_array_equal(seq.train.labels, np.asarray(
      [[data['train'][1][i] for i in row] for row in seq.train.index]))

  def body(carry, t):  # One pass over the tasks with a traced task id.
    x = benchmarks.task_inputs(seq, t, jnp.asarray(seq.train.index)[t, :8])
    return carry + x.sum(), x[0, 0]
  total, _ = jax.lax.scan(body, 0., jnp.arange(4))
  reference = sum(seq.images[seq.train.index[t, :8]].astype(np.float64).sum() / 255. for t in range(4))
  np.testing.assert_allclose(total, reference, rtol=1e-5)


def test_rotated_tasks_rotate_by_their_angle():
  seq = benchmarks.make_task_sequence(_fake_mnist(), 'rotated', 4, examples_per_task=10)
  np.testing.assert_allclose(seq.angles, [0., 45., 90., 135.])
  rows = seq.train.index[2, :3]
  got = benchmarks.task_inputs(seq, 2, rows).reshape(3, 28, 28)
  np.testing.assert_allclose(got, np.rot90(seq.images[rows], axes=(1, 2)) / 255., atol=1e-5)
  np.testing.assert_allclose(benchmarks.task_inputs(seq, 0, rows),
                             seq.images[rows].reshape(3, 784) / 255., atol=1e-6)


def test_split_mnist_pairs_task_and_class_incremental_labels():
  data = _fake_mnist()
  seq = benchmarks.make_task_sequence(data, 'split', 5, seed=0)
  assert seq.classes.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  labels = data['train'][1]
  smallest = min(int(np.isin(labels, pair).sum()) for pair in seq.classes)
  assert seq.train.index.shape == (5, smallest)
  for t, pair in enumerate(seq.classes):
    assert set(seq.train.labels[t].tolist()) <= set(pair.tolist())
    np.testing.assert_array_equal(seq.train.task_labels[t], seq.train.labels[t] - pair[0])
    assert len(set(seq.train.index[t].tolist())) == smallest
  assert len(set(seq.train.index.ravel().tolist())) == seq.train.index.size  # Tasks disjoint.
  with pytest.raises(ValueError, match='need more than 10 digits'):
    benchmarks.make_task_sequence(data, 'split', 6)


def test_agem_split_first_5000_train_images_are_validation(shared_data):
  data = benchmarks.load_mnist(shared_data / 'mnist')
  assert len(data['train'][0]) == 60000 and len(data['test'][0]) == 10000
  seq = benchmarks.make_task_sequence(data, 'permuted', 2, seed=0, num_validation=5000)
  train_x = data['train'][0]
  np.testing.assert_array_equal(seq.images[seq.val.index[0]], train_x[:5000])
  np.testing.assert_array_equal(seq.images[seq.train.index[1]], train_x[5000:])
  np.testing.assert_array_equal(seq.images[seq.test.index[0]], data['test'][0])
  np.testing.assert_array_equal(seq.train.labels[0], data['train'][1][5000:])
  with pytest.raises(ValueError, match="unknown protocol 'shuffled'"):
    benchmarks.make_task_sequence(data, 'shuffled', 2)
