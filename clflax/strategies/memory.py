"""Episodic memories: fixed-capacity pytree buffers, and how the compiled step reads those of finished tasks.

Buffers (NamedTuple pytrees with static capacity, so every function jit-compiles once):

* `ReplayBuffer` (`init`, `add`, `append`): slots 0..size-1 are filled.
  `add` is reservoir sampling over the stream of all examples seen (each of
  the n seen so far is stored with probability min(1, capacity / n));
  `append` writes deterministically in ring order (episodic memory filled at
  the end of a task, A-GEM style).
* `BalancedBuffer` (`init_balanced`, `add_balanced`): one reservoir per class
  (e.g. 25 per class, the A-GEM protocol), class c owning slots
  [c * per_class, (c + 1) * per_class). Examples with a label outside
  [0, num_classes) are skipped.

`sample` works on both: n stored examples, uniformly, without replacement when
n <= size (with replacement otherwise). An EMPTY buffer returns the init
zeros: the caller must weight the memory loss by `size(buffer) > 0` (a traced
bool), which is how the trainer can call it inside jit before any memory exists.

Layouts of a run's memories (`StepContext.memories`), chosen by the trainer: per task (vision), `memories[task]` is
a ReplayBuffer of that task's examples, read through the task's own head and empty until its stage ends; `SHARED`
(classic protocols: one head, one example shape), one buffer for all tasks filled in stage order with exactly m rows
per task, so rows k*m..(k+1)*m hold task k (`task_blocks`). When a strategy asks for them, each example also carries
the model's outputs at the end of its stage (under `OUTPUTS`).
"""
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

PyTree = Any


class ReplayBuffer(NamedTuple):
  data: PyTree      # Examples, each leaf with leading axis capacity.
  size: jax.Array   # int32 scalar: filled slots (0..capacity).
  seen: jax.Array   # int32 scalar: examples offered so far.


class BalancedBuffer(NamedTuple):
  data: PyTree      # Leading axis num_classes * per_class, class-major.
  size: jax.Array   # int32 [num_classes]: filled slots per class.
  seen: jax.Array   # int32 [num_classes]: examples of each class offered.


Buffer = Union[ReplayBuffer, BalancedBuffer]


def _empty(n: int, example: PyTree) -> PyTree:
  leaves = jax.tree.leaves(example)
  if not leaves:
    raise ValueError('example has no array leaves')
  def zeros(x):  # Arrays, scalars or jax.ShapeDtypeStruct.
    dtype = x.dtype if hasattr(x, 'dtype') else jnp.asarray(x).dtype
    return jnp.zeros((n,) + tuple(jnp.shape(x)), dtype)
  return jax.tree.map(zeros, example)


def _batch_size(batch: PyTree) -> int:
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'batch leaves must share one leading axis, got {sizes}')
  return sizes.pop()


def _check_batch(data: PyTree, batch: PyTree) -> int:
  if jax.tree.structure(data) != jax.tree.structure(batch):
    raise ValueError('batch structure does not match the buffer: '
                     f'{jax.tree.structure(batch)} vs {jax.tree.structure(data)}')
  for d, x in zip(jax.tree.leaves(data), jax.tree.leaves(batch)):
    if d.shape[1:] != jnp.shape(x)[1:]:
      raise ValueError(f'batch example shape {jnp.shape(x)[1:]} does not match '
                       f'the buffer example shape {d.shape[1:]}')
  return _batch_size(batch)


def _write(data: PyTree, slot: jax.Array, example: PyTree) -> PyTree:
  # Out-of-range slots (= "do not store") are dropped by the scatter.
  return jax.tree.map(
      lambda d, x: d.at[slot].set(jnp.asarray(x).astype(d.dtype), mode='drop'),
      data, example)


def init(capacity: int, example: PyTree) -> ReplayBuffer:
  """Empty buffer for `capacity` examples shaped like `example` (no batch axis)."""
  if not isinstance(capacity, int) or capacity <= 0:
    raise ValueError(f'capacity must be a positive int, got {capacity!r}')
  return ReplayBuffer(data=_empty(capacity, example),
                      size=jnp.zeros((), jnp.int32),
                      seen=jnp.zeros((), jnp.int32))


def add(buffer: ReplayBuffer, batch: PyTree, key: jax.Array,
        valid: Optional[jax.Array] = None) -> ReplayBuffer:
  """Reservoir sampling of the batch's examples, one after the other.

  Example number n of the stream (1-based) fills the next free slot while
  n <= capacity, else replaces a uniformly chosen slot with probability
  capacity / n. `valid` ([B] bool) skips padding examples (not counted).
  """
  capacity = _leading(buffer.data)
  b = _check_batch(buffer.data, batch)
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (b,):
    raise ValueError(f'valid must have shape ({b},), got {valid.shape}')

  def step(buf, inputs):
    example, ok, k = inputs
    seen = buf.seen + ok.astype(jnp.int32)
    j = jax.random.randint(k, (), 0, jnp.maximum(seen, 1))
    slot = jnp.where(buf.size < capacity, buf.size, j)
    slot = jnp.where(ok & (slot < capacity), slot, capacity)
    size = jnp.minimum(seen, capacity)
    return ReplayBuffer(_write(buf.data, slot, example), size, seen), None

  keys = jax.random.split(key, b)
  buffer, _ = jax.lax.scan(step, buffer, (batch, valid, keys))
  return buffer


def append(buffer: ReplayBuffer, batch: PyTree) -> ReplayBuffer:
  """Deterministic insertion at slots seen, seen+1, ... (mod capacity).

  If the batch is larger than the buffer, its last `capacity` examples win.
  """
  capacity = _leading(buffer.data)
  b = _check_batch(buffer.data, batch)
  idx = jnp.arange(b)
  slots = (buffer.seen + idx) % capacity
  slots = jnp.where(idx >= b - capacity, slots, capacity)  # Drop overwritten.
  data = _write(buffer.data, slots, batch)
  seen = buffer.seen + b
  return ReplayBuffer(data, jnp.minimum(buffer.size + b, capacity), seen)


def init_balanced(num_classes: int, per_class: int,
                  example: PyTree) -> BalancedBuffer:
  """Empty class-balanced buffer: per_class slots for each of num_classes."""
  for name, v in (('num_classes', num_classes), ('per_class', per_class)):
    if not isinstance(v, int) or v <= 0:
      raise ValueError(f'{name} must be a positive int, got {v!r}')
  return BalancedBuffer(data=_empty(num_classes * per_class, example),
                        size=jnp.zeros((num_classes,), jnp.int32),
                        seen=jnp.zeros((num_classes,), jnp.int32))


def add_balanced(buffer: BalancedBuffer, batch: PyTree, labels: jax.Array,
                 key: jax.Array) -> BalancedBuffer:
  """Per-class reservoir sampling; labels [B] int, out of range = skip."""
  num_classes = buffer.size.shape[0]
  per_class = _leading(buffer.data) // num_classes
  b = _check_batch(buffer.data, batch)
  labels = jnp.asarray(labels)
  if labels.shape != (b,):
    raise ValueError(f'labels must have shape ({b},), got {labels.shape}')

  def step(buf, inputs):
    example, label, k = inputs
    ok = (label >= 0) & (label < num_classes)
    c = jnp.clip(label, 0, num_classes - 1)
    seen_c = buf.seen[c] + 1
    j = jax.random.randint(k, (), 0, seen_c)
    pos = jnp.where(buf.size[c] < per_class, buf.size[c], j)
    slot = jnp.where(ok & (pos < per_class), c * per_class + pos,
                     num_classes * per_class)
    seen = buf.seen.at[c].add(ok.astype(jnp.int32))
    size = jnp.minimum(seen, per_class)
    return BalancedBuffer(_write(buf.data, slot, example), size, seen), None

  keys = jax.random.split(key, b)
  buffer, _ = jax.lax.scan(step, buffer, (batch, labels, keys))
  return buffer


def _leading(data: PyTree) -> int:
  return jax.tree.leaves(data)[0].shape[0]


def valid_slots(buffer: Buffer) -> jax.Array:
  """[capacity] bool: which slots hold a stored example."""
  if isinstance(buffer, BalancedBuffer):
    per_class = _leading(buffer.data) // buffer.size.shape[0]
    return (jnp.arange(per_class)[None, :] < buffer.size[:, None]).reshape(-1)
  return jnp.arange(_leading(buffer.data)) < buffer.size


def size(buffer: Buffer) -> jax.Array:
  """Total number of stored examples (int32 scalar)."""
  return jnp.sum(buffer.size)


def sample(buffer: Buffer, key: jax.Array, n: int) -> PyTree:
  """n stored examples drawn uniformly (without replacement if n <= size).

  An empty buffer gives n copies of the init zeros; check `size(buffer) > 0`.
  """
  if not isinstance(n, int) or n <= 0:
    raise ValueError(f'n must be a positive int, got {n!r}')
  capacity = _leading(buffer.data)
  valid = valid_slots(buffer)
  k_without, k_with = jax.random.split(key)
  # Without replacement: the n valid slots with the largest uniform scores.
  scores = jnp.where(valid, jax.random.uniform(k_without, (capacity,)), -1.0)
  _, without = jax.lax.top_k(scores, min(n, capacity))
  if n > capacity:
    without = jnp.concatenate([without, jnp.zeros((n - capacity,), jnp.int32)])
  # With replacement (n > size): uniform over the valid slots. (Not jax.random.categorical: its n x capacity
  # Gumbel draws made A-GEM's step 5x slower on CPU.)
  total = size(buffer)
  slots = jnp.flatnonzero(valid, size=capacity, fill_value=0)
  with_ = slots[jax.random.randint(k_with, (n,), 0, jnp.maximum(total, 1))]
  idx = jnp.where(n <= total, without, with_)
  idx = jnp.where(total > 0, idx, 0)
  return jax.tree.map(lambda d: d[idx], buffer.data)



SHARED = 'shared'  # `memories` key of the one buffer that tasks with a common head share.
OUTPUTS = 'logits'  # Example key of the model's outputs stored with it.


def available(ctx) -> bool:
  """Whether the step may learn from a memory at all (static: earlier tasks exist, or one shared buffer)."""
  return bool(ctx.earlier) or SHARED in ctx.memories


def sample_loss(ctx, params, memory, head, key, batch_size: int) -> jax.Array:
  """`head`'s loss on `batch_size` examples drawn from `memory` (without replacement when it holds enough)."""
  sample_key, drop_key = jax.random.split(key)
  batch = sample(memory, sample_key, batch_size)
  return ctx.loss(head, ctx.apply(params, batch, head, drop_key), batch)[0]


def memory_loss(ctx, params, key, batch_size: int, heads=None) -> jax.Array:
  """Loss on memory batches. Per-task memories: the mean over `heads` (default: the earlier tasks) of each one's
  loss-weighted loss on `batch_size` of its examples, through its own head. SHARED: `batch_size` examples drawn
  from all tasks stored so far, through the current head; zero while the buffer is empty."""
  if SHARED in ctx.memories:
    memory = ctx.memories[SHARED]
    return jnp.where(size(memory) > 0, sample_loss(ctx, params, memory, ctx.task, key, batch_size), 0.0)
  heads = ctx.earlier if heads is None else heads
  weights = ctx.config.train.loss_weights
  total = 0.0
  for head, head_key in zip(heads, jax.random.split(key, len(heads))):
    total += weights[head] * sample_loss(ctx, params, ctx.memories[head], head, head_key, batch_size)
  return total / len(heads)


def task_blocks(memory: ReplayBuffer, num_tasks: int):
  """The SHARED buffer as [T, m, ...] blocks (task k's memory in block k) and a [T] flag of the filled ones."""
  capacity = jax.tree.leaves(memory.data)[0].shape[0]
  if capacity % num_tasks:
    raise ValueError(f'the shared memory holds {capacity} rows, not {num_tasks} equal task blocks')
  m = capacity // num_tasks
  blocks = jax.tree.map(lambda d: d.reshape((num_tasks, m) + d.shape[1:]), memory.data)
  return blocks, memory.size >= (jnp.arange(num_tasks) + 1) * m
