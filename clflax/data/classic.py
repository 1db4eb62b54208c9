"""The classic protocols (Permuted / Rotated / Split MNIST) as data + model for the same trainer as the vision run.

The task pool lives on the device once (`benchmarks.TaskSequence`); each step's batch is gathered and permuted /
rotated inside the compiled epoch (`steps.jit_scan_epoch`), so a 5,500-step epoch is one call with no host work.
Every task shares one episodic memory (`steps.SHARED`) and, unless `config.classic.multi_head`, one output head.
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clflax.data import inputs
from clflax.data import benchmarks
from clflax.data import sources


class Pool(NamedTuple):
  """The device-side pool the compiled epochs read from."""
  images: jax.Array  # uint8 [P, 28, 28].
  perms: jax.Array  # int32 [T, 784].
  angles: jax.Array  # float32 [T].
  train_index: jax.Array  # int32 [T, n].
  train_labels: jax.Array  # int32 [T, n] (digit, or position within the task's classes when task-incremental).
  seed: jax.Array  # uint32 scalar: shuffling seed.


class TestPool(NamedTuple):
  """The device-side test sets the compiled evaluation reads from (rows padded to whole batches)."""
  images: jax.Array  # uint8 [P, 28, 28]: the same array as Pool.images.
  perms: jax.Array  # int32 [T, 784].
  angles: jax.Array  # float32 [T].
  index: jax.Array  # int32 [T, B * batch]: test rows, padding rows point at row 0.
  labels: jax.Array  # int32 [T, B * batch].
  valid: jax.Array  # bool [T, B * batch]: False on padding rows.


def task_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Stage names: the tasks after the `skip_tasks` used only for tuning, e.g. ('task4', ..., 'task20')."""
  c = config.classic
  return tuple(f'task{i + 1}' for i in range(c.skip_tasks, c.num_tasks))


def _sequence(config) -> benchmarks.TaskSequence:
  c = config.classic
  folder = sources.task_folder('mnist', config.data_dir, config.data)
  data = benchmarks.load_mnist(folder)
  return benchmarks.make_task_sequence(
      data, c.protocol, c.num_tasks, seed=config.seed, examples_per_task=c.examples_per_task or None,
      test_examples_per_task=c.test_examples_per_task or None, num_validation=c.num_validation,
      classes_per_task=c.classes_per_task)


def _inputs(seq, task_id, rows):
  """float32 [n, 784] in [0, 1] as task `task_id` sees them (host side; JAX only for a rotation)."""
  if seq.angles[task_id] != 0:
    return np.asarray(benchmarks.task_inputs(seq, jnp.asarray(task_id), jnp.asarray(rows)))
  x = seq.images[rows].reshape(len(rows), -1).astype(np.float32) / 255.
  return x[:, seq.perms[task_id]]


def joint_batch_fn(pool: Pool, task_id, epoch, step, *, batch_size: int, multi_head: bool, first_task: int):
  """The multi-task upper bound: each example from a uniformly drawn task >= `first_task` and a uniformly drawn row
  of it, so a stage's 5,500 steps see every task mixed (17 stages = one epoch over the union, in expectation)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(pool.seed), task_id), epoch), step)
  task_key, row_key = jax.random.split(key)
  num_tasks, n = pool.train_index.shape
  task_ids = jax.random.randint(task_key, (batch_size,), first_task, num_tasks)
  picks = jax.random.randint(row_key, (batch_size,), 0, n)
  seq_like = benchmarks.TaskSequence(pool.images, pool.perms, pool.angles, None, None, None, None)
  one = lambda t, r: benchmarks.task_inputs(seq_like, t, r[None])[0]  # noqa: E731
  batch = {'image': jax.vmap(one)(task_ids, pool.train_index[task_ids, picks]),
           'label': pool.train_labels[task_ids, picks], 'valid': jnp.ones((batch_size,), bool)}
  if multi_head:
    batch['head'] = task_ids
  return batch


def batch_fn(pool: Pool, task_id, epoch, step, *, batch_size: int, multi_head: bool):
  """Step `step` of `epoch`'s shuffled pass over task `task_id` (jittable)."""
  n = pool.train_index.shape[1]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(pool.seed), task_id), epoch)
  order = jax.random.permutation(key, n)
  pick = jax.lax.dynamic_slice(order, (step * batch_size,), (batch_size,))
  rows = pool.train_index[task_id][pick]
  seq_like = benchmarks.TaskSequence(pool.images, pool.perms, pool.angles, None, None, None, None)
  batch = {'image': benchmarks.task_inputs(seq_like, task_id, rows),
           'label': pool.train_labels[task_id][pick], 'valid': jnp.ones((batch_size,), bool)}
  if multi_head:
    batch['head'] = jnp.full((batch_size,), task_id, jnp.int32)
  return batch


def eval_batch_fn(pool: TestPool, task_id, index, *, batch_size: int, multi_head: bool):
  """Padded test batch `index` of task `task_id` (jittable; the device-side twin of `_EvalBatches`)."""
  start = index * batch_size
  take = lambda a: jax.lax.dynamic_slice(a[task_id], (start,), (batch_size,))  # noqa: E731
  seq_like = benchmarks.TaskSequence(pool.images, pool.perms, pool.angles, None, None, None, None)
  batch = {'image': benchmarks.task_inputs(seq_like, task_id, take(pool.index)), 'label': take(pool.labels),
           'valid': take(pool.valid)}
  if multi_head:
    batch['head'] = jnp.full((batch_size,), task_id, jnp.int32)
  return batch


def _test_pool(pool: Pool, split, labels, batch_size: int) -> tuple[TestPool, int]:
  """The test split on the device, each task's rows padded to whole batches; and the batches per task."""
  n = split.index.shape[1]
  batches = -(-n // batch_size)
  pad = ((0, 0), (0, batches * batch_size - n))
  valid = np.pad(np.ones_like(split.index, bool), pad)
  return TestPool(pool.images, pool.perms, pool.angles, jnp.asarray(np.pad(split.index, pad)),
                  jnp.asarray(np.pad(labels, pad)), jnp.asarray(valid)), batches


class _EvalBatches:
  """A task's test split in padded batches, built on the host when read."""

  def __init__(self, seq, task_id, split, labels, batch_size, multi_head):
    self.seq, self.task_id, self.split, self.labels = seq, task_id, split, labels
    self.batch_size, self.multi_head = batch_size, multi_head
    self.rows = split.index[task_id]

  def __len__(self):
    return -(-len(self.rows) // self.batch_size)

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    picks = np.arange(i * self.batch_size, (i + 1) * self.batch_size)
    valid = picks < len(self.rows)
    picks = np.where(valid, picks, 0)
    batch = {'image': _inputs(self.seq, self.task_id, self.rows[picks]),
             'label': self.labels[self.task_id][picks], 'valid': valid}
    if self.multi_head:
      batch['head'] = np.full(len(picks), self.task_id, np.int32)
    return batch

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def load_data(config: ml_collections.ConfigDict) -> inputs.Data:
  """The classic protocol of `config.classic` as trainer data (one epoch = a pass over each task's examples)."""
  c, train_cfg = config.classic, config.train
  seq = _sequence(config)
  task_incremental = c.protocol == 'split' and c.multi_head
  split_labels = lambda split: split.task_labels if task_incremental else split.labels  # noqa: E731
  names = task_names(config)
  ids = {name: c.skip_tasks + i for i, name in enumerate(names)}
  n_train = seq.train.index.shape[1]
  steps = n_train // train_cfg.batch_size
  if config.train.steps_per_epoch:
    steps = min(steps, config.train.steps_per_epoch)
  if steps == 0:
    raise ValueError(f'classic: {n_train} examples per task give no full batch of {train_cfg.batch_size}')
  pool = Pool(jnp.asarray(seq.images), jnp.asarray(seq.perms), jnp.asarray(seq.angles),
              jnp.asarray(seq.train.index), jnp.asarray(split_labels(seq.train)), jnp.asarray(config.seed, jnp.uint32))
  if c.get('joint'):
    fn = lambda p, t, e, s: joint_batch_fn(p, t, e, s, batch_size=train_cfg.batch_size,  # noqa: E731
                                           multi_head=c.multi_head, first_task=c.skip_tasks)
  else:
    fn = lambda p, t, e, s: batch_fn(p, t, e, s, batch_size=train_cfg.batch_size, multi_head=c.multi_head)  # noqa

  def memory_examples(task, count):
    """`count` training examples of `task`, the same number of each class (25 per class for 250)."""
    if count is None:
      raise ValueError('the classic protocols train jointly with config.classic.joint, not whole-set memories')
    t = ids[task]
    rng = np.random.default_rng([config.seed, t])
    labels = split_labels(seq.train)[t]
    classes = np.unique(labels)
    want = max(1, count // len(classes))
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == k), want, replace=False) for k in classes])
    picks = rng.permutation(picks)
    batch = {'image': _inputs(seq, t, seq.train.index[t][picks]), 'label': labels[picks]}
    if c.multi_head:
      batch['head'] = np.full(len(picks), t, np.int32)
    return batch

  test_pool, eval_batches = _test_pool(pool, seq.test, split_labels(seq.test), train_cfg.eval_batch_size)
  eval_fn = lambda p, t, b: eval_batch_fn(p, t, b, batch_size=train_cfg.eval_batch_size,  # noqa: E731
                                          multi_head=c.multi_head)
  example = jax.device_get(jax.jit(fn)(pool, c.skip_tasks, 0, 0))  # One compile, not ~40 op-by-op ones (1.7 s).
  joint = '; trained jointly (every stage draws from all tasks: the multi-task upper bound)' if c.get('joint') else ''
  description = (f'{c.protocol} MNIST: {len(names)} tasks (after {c.skip_tasks} tuning tasks) of {n_train} '
                 f'training examples, {seq.test.index.shape[1]} test examples each, from '
                 f'{sources.task_folder("mnist", config.data_dir, config.data)}{joint}')
  return inputs.Data(
      description=description, train_sets={t: None for t in names}, steps_per_epoch={t: steps for t in names},
      eval_batches={t: _EvalBatches(seq, ids[t], seq.test, split_labels(seq.test), config.train.eval_batch_size,
                                    c.multi_head) for t in names},
      example_batches={t: example for t in names}, memory_examples=memory_examples,
      scan=(pool, fn, ids), device_eval=(test_pool, eval_fn, eval_batches, ids))
