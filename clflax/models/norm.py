"""Batch norm on running statistics fused with its activation, for the frozen (and inference) backbone.

On fixed statistics batch norm is one per-channel affine map, x * a + b. Written as flax's nn.BatchNorm it keeps
`x - mean` for the scale's gradient and the activation keeps its sigmoid: two activation-sized tensors written per
layer on top of the output, each another pass over memory on CPU (B0 block 1: 38 MB each). `affine_act` keeps only
its input x, which the convolution before it has written anyway, and recomputes the rest in its backward pass.
`FrozenBatchNorm` has nn.BatchNorm's variables (names, shapes, initialisers), so checkpoints are interchangeable.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ('linear', 'silu', 'relu6')


def _activation(t: jax.Array, act: str) -> jax.Array:
  if act == 'silu':
    return t * jax.nn.sigmoid(t)
  if act == 'relu6':
    return jnp.clip(t, 0, 6)
  return t


def _activation_slope(t: jax.Array, act: str) -> jax.Array:
  """d act(t) / dt, elementwise."""
  if act == 'silu':
    s = jax.nn.sigmoid(t)
    return s * (1 + t * (1 - s))
  if act == 'relu6':
    return ((t > 0) & (t < 6)).astype(t.dtype)
  return jnp.ones_like(t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def affine_act(x: jax.Array, a: jax.Array, b: jax.Array, act: str = 'linear') -> jax.Array:
  """act(x * a + b) with per-channel (last axis) `a`, `b`; its backward keeps only x, a, b."""
  return _activation(x * a + b, act)


def _affine_act_fwd(x, a, b, act):
  return affine_act(x, a, b, act), (x, a, b)


def _affine_act_bwd(act, residuals, g):
  # The barrier keeps XLA from merging this recomputation with the forward's: it would then write the shared
  # sigmoid out for both, the very tensor this function exists not to keep.
  x, a, b = jax.lax.optimization_barrier(residuals)
  dt = g * _activation_slope(x * a + b, act)
  axes = tuple(range(x.ndim - 1))
  return dt * a, jnp.sum(dt * x, axes).astype(a.dtype), jnp.sum(dt, axes).astype(b.dtype)


affine_act.defvjp(_affine_act_fwd, _affine_act_bwd)


class FrozenBatchNorm(nn.Module):
  """nn.BatchNorm(use_running_average=True) over the last axis, then `act`, as one `affine_act`.

  Same variables as nn.BatchNorm: params 'scale' (ones), 'bias' (zeros); batch_stats 'mean' (zeros), 'var' (ones).
  The statistics are read, never updated.
  """
  act: str = 'linear'
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    if self.act not in ACTIVATIONS:
      raise ValueError(f'act must be one of {ACTIVATIONS}, got {self.act!r}')
    c = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (c,)).value
    var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (c,)).value
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    b = bias - mean * a
    return affine_act(x, a.astype(x.dtype), b.astype(x.dtype), self.act)
