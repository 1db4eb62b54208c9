"""The clflax MNIST protocols' tasks in plain numpy (no JAX, no torch), for the peer-library runners.

This re-implements, call for call, what clflax does in `clflax/data/benchmarks.py` (`permutations`,
`_task_split`, `make_task_sequence`) with the settings of `clflax/configs/mnist.py` (`permuted`, `split`), so that
seed s gives the same permutations, the same training rows (in the same sorted order), the same test rows and the
same validation hold-out as a clflax run with `config.seed = s`. `check_protocols.py` compares the two.

What clflax does (and so what this does):
- Pool order: training images 5,000..59,999 (the first `num_validation` = 5,000 are the validation hold-out), then
  the validation images, then the 10,000 test images.
- rng = np.random.default_rng(seed). For every task, in task order: `np.sort(rng.choice(pool_rows_of_its_classes,
  n, replace=False))` for the training split (n = `examples_per_task`, or None = the smallest task's count), then
  the same over the validation pool (n = None), then over the test pool (n = `test_examples_per_task` or None).
- Permuted MNIST: 20 tasks; pixel permutations from a SEPARATE np.random.default_rng(seed), one
  rng.permutation(784) per task; all 10 digits per task, so with n = None every task uses all 55,000 training rows
  (in pool order) and all 10,000 test rows. The first 3 tasks are tuning tasks: tasks 4..20 are trained.
- Split MNIST: 5 tasks of digits (0, 1), (2, 3), ..., (8, 9), identity permutation, all 5 trained. With n = None
  EVERY task gets the smallest task's count: 10,294 random training rows (digits 4/5 have 10,294 after the
  hold-out) and 1,874 random test rows (digits 4/5 have 1,874 test images). Labels are the digits (one 10-way head).
"""
import gzip
import os
from typing import NamedTuple, Optional

import numpy as np

NUM_PIXELS = 784
NUM_CLASSES = 10
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data', 'mnist')

# The clflax protocol settings (clflax/configs/mnist.py: permuted() and split()).
PROTOCOLS = {
    'permuted': dict(num_tasks=20, skip_tasks=3, classes_per_task=10, num_validation=5000),
    'split': dict(num_tasks=5, skip_tasks=0, classes_per_task=2, num_validation=5000),
}


def read_idx(path: str) -> np.ndarray:
  with open(path, 'rb') as f:
    raw = f.read()
  if path.endswith('.gz'):
    raw = gzip.decompress(raw)
  if raw[0] or raw[1] or raw[2] != 0x08:
    raise ValueError(f'{path}: not a uint8 idx file')
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(folder: str) -> dict:
  """{'train': (uint8 [60000, 28, 28], int32 [60000]), 'test': (...)} from the four idx(.gz) files."""
  def find(stem):
    for name in (stem + '.gz', stem):
      if os.path.exists(os.path.join(folder, name)):
        return os.path.join(folder, name)
    raise FileNotFoundError(f'{stem}(.gz) not in {folder}')
  out = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images = read_idx(find(f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(find(f'{prefix}-labels-idx1-ubyte')).astype(np.int32)
    out[split] = (images, labels)
  return out


def permutations(num_tasks: int, seed: int) -> np.ndarray:
  """int32 [T, 784], as clflax.data.benchmarks.permutations."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(NUM_PIXELS) for _ in range(num_tasks)]).astype(np.int32)


def split_classes(num_tasks: int, classes_per_task: int) -> np.ndarray:
  return np.arange(num_tasks * classes_per_task, dtype=np.int32).reshape(num_tasks, classes_per_task)


def _task_split(rng, rows, labels, classes, n):
  """As clflax.data.benchmarks._task_split: per task n random rows (sorted) whose label is in its classes."""
  pools = [rows[np.isin(labels[rows], c)] for c in classes]
  most = min(len(p) for p in pools)
  n = most if n is None else n
  if n > most:
    raise ValueError(f'{n} examples per task requested, a task has only {most}')
  index = np.stack([np.sort(rng.choice(p, n, replace=False)) for p in pools]).astype(np.int32)
  return index, labels[index].astype(np.int32)


class Tasks(NamedTuple):
  images: np.ndarray  # uint8 [P, 28, 28] pool: training rows, validation rows, test rows.
  perms: np.ndarray  # int32 [T, 784].
  classes: np.ndarray  # int32 [T, C].
  train_index: np.ndarray  # int32 [T, n] pool rows.
  train_labels: np.ndarray  # int32 [T, n] digits.
  test_index: np.ndarray
  test_labels: np.ndarray
  skip_tasks: int  # Leading tuning tasks (not trained).


def make_tasks(data: dict, protocol: str, seed: int, examples_per_task: Optional[int] = None,
               test_examples_per_task: Optional[int] = None) -> Tasks:
  """The protocol's tasks exactly as clflax builds them for `config.seed = seed` (see the module docstring)."""
  p = PROTOCOLS[protocol]
  num_tasks, num_validation = p['num_tasks'], p['num_validation']
  (train_x, train_y), (test_x, test_y) = data['train'], data['test']
  rng = np.random.default_rng(seed)
  if protocol == 'permuted':
    perms = permutations(num_tasks, seed)
    classes = np.tile(np.arange(NUM_CLASSES, dtype=np.int32), (num_tasks, 1))
  else:
    perms = np.tile(np.arange(NUM_PIXELS, dtype=np.int32), (num_tasks, 1))
    classes = split_classes(num_tasks, p['classes_per_task'])
  images = np.concatenate([train_x[num_validation:], train_x[:num_validation], test_x])
  labels = np.concatenate([train_y[num_validation:], train_y[:num_validation], test_y])
  n_train = len(train_x) - num_validation
  pools = (np.arange(n_train), np.arange(n_train, len(train_x)), np.arange(len(train_x), len(images)))
  train_index, train_labels = _task_split(rng, pools[0], labels, classes, examples_per_task)
  if num_validation:
    _task_split(rng, pools[1], labels, classes, None)  # Validation rows: unused, but they advance the rng.
  test_index, test_labels = _task_split(rng, pools[2], labels, classes, test_examples_per_task)
  return Tasks(images, perms, classes, train_index, train_labels, test_index, test_labels, p['skip_tasks'])


def task_inputs(tasks: Tasks, task: int, rows: np.ndarray) -> np.ndarray:
  """float32 [n, 784] in [0, 1]: pool rows as task `task` sees them (pixels / 255, flattened, permuted)."""
  x = tasks.images[rows].reshape(len(rows), NUM_PIXELS).astype(np.float32) / 255.
  return x[:, tasks.perms[task]]


def continual_summary(matrix) -> dict:
  """A_T, F_T and BWT as clflax.metrics.continual_summary, on the square part R[l, j], l, j < T (fractions).

  R[l, j] = accuracy on task j after stage l. A_T = mean_j R[T-1, j];
  F_T = mean_{j<T-1} max_{l<T-1} (R[l, j] - R[T-1, j]) (l < j included, as in clflax);
  BWT = mean_{j<T-1} (R[T-1, j] - R[j, j]).
  """
  r = np.asarray(matrix, np.float64)
  t = r.shape[0]
  r = r[:, :t]
  final = r[-1]
  out = {'A_T': float(final.mean()), 'F_T': 0.0, 'BWT': 0.0}
  if t > 1:
    out['F_T'] = float(np.mean(np.max(r[:-1, :-1] - final[None, :-1], axis=0)))
    out['BWT'] = float(np.mean(final[:-1] - np.diag(r)[:-1]))
  return out
