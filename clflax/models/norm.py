"""Batch norm on running statistics, folded into the convolution before it, for the frozen (and inference) backbone.

On fixed statistics batch norm is one per-channel affine map, bn(h) = h * a + b, so conv(x, W) * a + b equals
conv(x, W * a) + b: `FrozenBatchNorm` returns (a, b), the layer before scales its kernel's output channels by a
(`out_scale`), and `bias_act` adds b and the activation. Autodiff then finds a's and the kernel's gradients from the
(small) folded kernel's gradient; written as flax's nn.BatchNorm + activation, training wrote `h - mean`, the
sigmoid and the cotangent times a, and reduced two activation-sized products for the scale's and bias's gradients,
each another pass over memory on CPU (B0 block 1: 38 MB each). `bias_act` keeps only its input h, which the
convolution has written anyway, and recomputes the activation's slope in its backward pass.
`FrozenBatchNorm` has nn.BatchNorm's variables (names, shapes, initialisers), so checkpoints are interchangeable.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from clflax.models import convs

# The activations a conv + batch norm may end in (EfficientNet: silu; Lite: relu6; the projection: none).
ACTIVATIONS = {'linear': lambda t: t, 'silu': jax.nn.silu, 'relu6': jax.nn.relu6}


def _activation_slope(t: jax.Array, act: str) -> jax.Array:
  """d act(t) / dt, elementwise, for the nonlinear ACTIVATIONS."""
  if act == 'silu':
    s = jax.nn.sigmoid(t)
    return s * (1 + t * (1 - s))
  return ((t > 0) & (t < 6)).astype(t.dtype)  # relu6


def bias_act(h: jax.Array, b: jax.Array, act: str = 'linear') -> jax.Array:
  """act(h + b) with a per-channel (last axis) `b`; on CPU a nonlinear act's backward keeps only h and b (elsewhere
  plain autodiff: GPU / TPU compilers fuse the activation into its neighbours themselves)."""
  if act not in ACTIVATIONS:
    raise ValueError(f'act must be one of {tuple(ACTIVATIONS)}, got {act!r}')
  b = b.astype(h.dtype)  # A float32 shift must not lift bfloat16 activations to float32.
  if act == 'linear':
    return h + b
  return _bias_act(h, b, act) if convs.cpu_tuned() else ACTIVATIONS[act](h + b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_act(h, b, act):
  return ACTIVATIONS[act](h + b)


def _bias_act_fwd(h, b, act):
  return ACTIVATIONS[act](h + b), (h, b)


def _bias_act_bwd(act, residuals, g):
  # The barrier keeps XLA from merging this recomputation with the forward's: it would then write the shared
  # sigmoid out for both, the very tensor this function exists not to keep.
  h, b = jax.lax.optimization_barrier(residuals)
  dt = g * _activation_slope(h + b, act)
  return dt, jnp.sum(dt, tuple(range(h.ndim - 1))).astype(b.dtype)


_bias_act.defvjp(_bias_act_fwd, _bias_act_bwd)


class FrozenBatchNorm(nn.Module):
  """nn.BatchNorm(use_running_average=True) over `channels` as its affine map: returns (a, b), bn(h) = h * a + b.

  Same variables as nn.BatchNorm: params 'scale' (ones), 'bias' (zeros); batch_stats 'mean' (zeros), 'var' (ones).
  The statistics are read, never updated.
  """
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
    mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (channels,)).value
    var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (channels,)).value
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    return a, bias - mean * a
