"""Shared pieces of the quadratic-penalty strategies (EWC, MAS, SI, L2).

All four pull the parameters towards an anchor with a per-parameter weight:
  penalty = 0.5 * sum_i w_i * (theta_i - anchor_i)^2,
and differ only in how w is estimated. Each strategy keeps its OWN NamedTuple
state type (so several can sit in one optax chain and be found by type); the
transform logic and the per-example estimators live here once.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def penalty(params: PyTree, anchor: PyTree, weight: PyTree) -> jax.Array:
  """0.5 * sum(weight * (params - anchor)^2) over all leaves, as a scalar."""
  terms = jax.tree.map(
      lambda p, a, w: jnp.sum(w * jnp.square(p - a)), params, anchor, weight)
  return 0.5 * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def add_penalty_grad(updates: PyTree, params: PyTree, anchor: PyTree,
                     weight: PyTree, strength) -> PyTree:
  """updates + strength * weight * (params - anchor): grad of strength*penalty."""
  return jax.tree.map(
      lambda u, p, a, w: u + (strength * w * (p - a)).astype(u.dtype),
      updates, params, anchor, weight)


def check_strength(name: str, strength) -> None:
  if isinstance(strength, (int, float)) and not strength >= 0:
    raise ValueError(f'{name}: strength must be >= 0, got {strength}')


def require_params(name: str, params: Optional[PyTree]) -> PyTree:
  if params is None:
    raise ValueError(f'{name} needs the current params: call '
                     f'tx.update(updates, opt_state, params)')
  return params


def penalty_transform(
    name: str,
    strength: float,
    init_state: Callable[[PyTree], Any],
    weight_of: Callable[[Any], PyTree],
) -> optax.GradientTransformationExtraArgs:
  """An optax transform adding strength * weight_of(state) * (params - anchor).

  `init_state(params)` builds the strategy's own NamedTuple (which must have an
  `anchor` field); `weight_of(state)` returns a pytree like params (or of
  scalars broadcastable to it). The state only changes at consolidation time,
  which the trainer does outside the optimizer (see registry.replace_state).
  """
  check_strength(name, strength)

  def update_fn(updates, state, params=None, **extra):
    del extra  # ref_grads etc. are meant for other transforms of the chain.
    params = require_params(name, params)
    updates = add_penalty_grad(updates, params, state.anchor,
                               weight_of(state), strength)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_state, update_fn)


def merge(old: PyTree, new: PyTree, decay) -> PyTree:
  """Online accumulation decay * old + new (decay=0 replaces)."""
  return jax.tree.map(lambda o, n: decay * o + n.astype(o.dtype), old, new)


def _batch_size(batch: PyTree) -> int:
  sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)}
  if not sizes:
    raise ValueError('batch is empty: it has no array leaves')
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'batch leaves must share one leading axis, got sizes {sizes}')
  n = sizes.pop()
  if n == 0:
    raise ValueError('batch has 0 examples')
  return n


def sum_leading(x: jax.Array) -> jax.Array:
  """x summed over its leading axis, as halving adds of slices (log2 of the axis levels).

  The same sum as jnp.sum(x, axis=0), but XLA:CPU runs a reduce over a short leading axis with a large output
  element by element with a strided inner loop: the Fisher's per-example sums (4 x 1152 x 320 floats) ran 40-50x
  slower as a reduce than as these adds, which fuse into one vectorised loop.
  """
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    pairs = x[:half] + x[half:2 * half]
    if x.shape[0] % 2:
      pairs = pairs.at[0].add(x[2 * half])
    x = pairs
  return x[0]


def per_example_mean(fn: Callable[[PyTree, PyTree], PyTree], params: PyTree,
                     batch: PyTree, chunk_size: Optional[int] = None) -> PyTree:
  """Mean over the batch of fn(params, example), vmapped per example.

  With `chunk_size`, whole chunks go through `jax.lax.scan` (memory bounded by
  one chunk of per-example results, each chunk added to a running sum) and the
  remainder N % chunk_size through one more vmap, so the mean stays exact.
  """
  n = _batch_size(batch)
  if chunk_size is not None and (
      not isinstance(chunk_size, int) or chunk_size <= 0):
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
  per_example = jax.vmap(fn, in_axes=(None, 0))

  def chunk_sum(chunk):
    return jax.tree.map(sum_leading, per_example(params, chunk))

  if chunk_size is None or chunk_size >= n:
    total = chunk_sum(batch)
  else:
    k = n // chunk_size
    m = k * chunk_size
    chunks = jax.tree.map(
        lambda x: x[:m].reshape((k, chunk_size) + x.shape[1:]), batch)
    first = jax.tree.map(lambda x: x[0], chunks)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(chunk_sum, first))
    total, _ = jax.lax.scan(
        lambda acc, chunk: (jax.tree.map(jnp.add, acc, chunk_sum(chunk)), None),
        zeros, chunks)
    if m < n:
      rest = chunk_sum(jax.tree.map(lambda x: x[m:], batch))
      total = jax.tree.map(jnp.add, total, rest)
  return jax.tree.map(lambda t: t / n, total)
