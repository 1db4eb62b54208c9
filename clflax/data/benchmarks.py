"""Classic continual-learning protocols on MNIST: Permuted, Rotated and Split MNIST.

A TaskSequence keeps ONE copy of the images; tasks differ by per-task index rows, a pixel
permutation and a rotation angle, applied on the fly (`task_inputs`, jittable with a traced task
id), so 20 permuted tasks cost 20 x 784 ints, not 20 copies. Arrays with a leading task axis T
can be scanned over with `jax.lax.scan` or indexed by task id.

The A-GEM paper's split: the first `num_validation` (5,000) training images form the validation
pool, the remaining 55,000 the training pool; the 10,000 test images are the test pool.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clflax.data import mnist

NUM_CLASSES = 10
NUM_PIXELS = 28 * 28


class TaskSplit(NamedTuple):
  """Per task the rows of TaskSequence.images it uses, with their labels."""
  index: np.ndarray  # int32 [T, n] rows of TaskSequence.images.
  labels: np.ndarray  # int32 [T, n] digit (class-incremental label).
  task_labels: np.ndarray  # int32 [T, n] position of the digit in classes[t] (task-incremental).


class TaskSequence(NamedTuple):
  """T tasks over one shared image pool; see the module docstring."""
  images: np.ndarray  # uint8 [P, 28, 28]: training pool, then validation pool, then test pool.
  perms: np.ndarray  # int32 [T, 784] pixel permutation per task (identity when not permuted).
  angles: np.ndarray  # float32 [T] rotation in degrees per task (0 when not rotated).
  classes: np.ndarray  # int32 [T, C] digits of each task (all 10 for permuted / rotated).
  train: TaskSplit
  val: TaskSplit  # n = 0 when num_validation is 0.
  test: TaskSplit


def load_mnist(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train': (uint8 [60000, 28, 28], int32 [60000]), 'test': (...)} from the idx(.gz) files."""
  return mnist.read_mnist(folder)


def permutations(num_tasks: int, seed: int) -> np.ndarray:
  """int32 [T, 784]: an independent random pixel permutation per task, fixed by the seed."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(NUM_PIXELS) for _ in range(num_tasks)]).astype(np.int32)


def rotation_angles(num_tasks: int, max_degrees: float = 180., seed: int | None = None) -> np.ndarray:
  """float32 [T] angles: evenly spaced over [0, max_degrees) or, with a seed, uniform random."""
  if seed is None:
    return (np.arange(num_tasks) * max_degrees / num_tasks).astype(np.float32)
  return np.random.default_rng(seed).uniform(0., max_degrees, num_tasks).astype(np.float32)


def split_classes(num_tasks: int = 5, classes_per_task: int = 2) -> np.ndarray:
  """int32 [T, k]: consecutive digit groups, (0, 1), (2, 3), ... for Split MNIST."""
  if num_tasks * classes_per_task > NUM_CLASSES:
    raise ValueError(f'{num_tasks} tasks of {classes_per_task} classes need more than 10 digits')
  return np.arange(num_tasks * classes_per_task, dtype=np.int32).reshape(num_tasks, classes_per_task)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates [..., H, W] images counter-clockwise about their centre (bilinear, zeros outside)."""
  h, w = images.shape[-2:]
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing='ij')
  cy, cx = (h - 1) / 2, (w - 1) / 2
  # Inverse map (rows grow downwards): output pixel (y, x) reads the input point rotated back.
  src_y = cy + (y - cy) * jnp.cos(theta) + (x - cx) * jnp.sin(theta)
  src_x = cx - (y - cy) * jnp.sin(theta) + (x - cx) * jnp.cos(theta)
  flat = images.reshape(-1, h, w).astype(jnp.float32)
  out = jax.vmap(lambda im: jax.scipy.ndimage.map_coordinates(
      im, [src_y, src_x], order=1, mode='constant', cval=0.))(flat)
  return out.reshape(images.shape)


def task_inputs(seq: TaskSequence, task: jax.Array, index: jax.Array) -> jax.Array:
  """float32 [n, 784] in [0, 1]: images[index] as task `task` sees them (rotated, permuted).

  Under jit pass `seq` as an argument (e.g. `jax.device_put(seq)`), not as a closure: a closed-over
  numpy pool would be baked into the program as a 55 MB constant.
  """
  x = jnp.asarray(seq.images)[index].astype(jnp.float32) / 255.
  angle = jnp.asarray(seq.angles)[task]
  x = jax.lax.cond(angle != 0, rotate, lambda im, _: im, x, angle)
  return x.reshape(x.shape[0], NUM_PIXELS)[:, jnp.asarray(seq.perms)[task]]


def _task_split(rng, rows: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                n: int | None) -> TaskSplit:
  """Per task, n random rows (all usable ones when n is None) whose label is in its classes."""
  pools = [rows[np.isin(labels[rows], c)] for c in classes]
  most = min(len(p) for p in pools)
  n = most if n is None else n
  if n > most:
    raise ValueError(f'{n} examples per task requested, a task has only {most}')
  index = np.stack([np.sort(rng.choice(p, n, replace=False)) for p in pools]).astype(np.int32)
  digits = labels[index]
  position = np.stack([np.searchsorted(c, d) for c, d in zip(classes, digits)]).astype(np.int32)
  return TaskSplit(index, digits.astype(np.int32), position)


def make_task_sequence(data: dict[str, tuple[np.ndarray, np.ndarray]], protocol: str,
                       num_tasks: int, *, seed: int = 0, examples_per_task: int | None = None,
                       test_examples_per_task: int | None = None, num_validation: int = 0,
                       classes_per_task: int = 2, max_degrees: float = 180.) -> TaskSequence:
  """Builds a protocol ('permuted', 'rotated' or 'split') from load_mnist's dict.

  Each task draws `examples_per_task` training rows at random (None: every usable row; for
  split, the smallest task's count). `num_validation=5000` gives the A-GEM paper's split.
  """
  (train_x, train_y), (test_x, test_y) = data['train'], data['test']
  if not 0 <= num_validation < len(train_x):
    raise ValueError(f'num_validation={num_validation} must be in [0, {len(train_x)})')
  if num_tasks < 1:
    raise ValueError(f'num_tasks must be >= 1, got {num_tasks}')
  rng = np.random.default_rng(seed)
  identity = np.tile(np.arange(NUM_PIXELS, dtype=np.int32), (num_tasks, 1))
  no_rotation = np.zeros(num_tasks, np.float32)
  all_digits = np.tile(np.arange(NUM_CLASSES, dtype=np.int32), (num_tasks, 1))
  if protocol == 'permuted':
    perms, angles, classes = permutations(num_tasks, seed), no_rotation, all_digits
  elif protocol == 'rotated':
    perms, angles, classes = identity, rotation_angles(num_tasks, max_degrees), all_digits
  elif protocol == 'split':
    perms, angles, classes = identity, no_rotation, split_classes(num_tasks, classes_per_task)
  else:
    raise ValueError(f"unknown protocol {protocol!r}; expected 'permuted', 'rotated' or 'split'")
  # Pool order: training rows (after the validation ones), validation rows, test rows.
  images = np.concatenate([train_x[num_validation:], train_x[:num_validation], test_x])
  labels = np.concatenate([train_y[num_validation:], train_y[:num_validation], test_y])
  n_train = len(train_x) - num_validation
  pools = (np.arange(n_train), np.arange(n_train, len(train_x)),
           np.arange(len(train_x), len(images)))
  train = _task_split(rng, pools[0], labels, classes, examples_per_task)
  val = (_task_split(rng, pools[1], labels, classes, None) if num_validation else
         TaskSplit(*(np.zeros((num_tasks, 0), np.int32),) * 3))
  test = _task_split(rng, pools[2], labels, classes, test_examples_per_task)
  return TaskSequence(images, perms, angles, classes, train, val, test)
