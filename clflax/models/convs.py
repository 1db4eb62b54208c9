"""The convolutions of the models, each with a backward pass XLA:CPU runs well (same maths on GPU / TPU).

The CPU-tuned forms (custom backward passes, the shifted depthwise sum, im2col) are chosen only when the backend is
CPU (`cpu_tuned()`); on GPU / TPU every layer is the plain XLA op and its autodiff, which cuDNN / the TPU compiler
fuse and tile themselves. `PointwiseConv` (1x1 as a matmul), `DepthwiseConv` and `Conv` (dense k x k) keep
nn.Conv's parameter names, shapes and initialisers, so checkpoints and imported weights are interchangeable; each
takes an optional `out_scale` per output channel (a frozen batch norm folded in).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _scaled(w: jax.Array, out_scale) -> jax.Array:
  """w with its output channels (last axis) times `out_scale`: the layers' `out_scale` gives conv(x) * out_scale,
  a frozen batch norm's scale folded into the kernel (clflax.models.norm)."""
  return w if out_scale is None else w * out_scale.astype(w.dtype)


def cpu_tuned() -> bool:
  """Whether the layers use their CPU-tuned forms: when the default backend (where jit places the step) is CPU."""
  return jax.default_backend() == 'cpu'


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding of one axis: output ceil(size / stride), odd pad at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def resolve_depthwise(impl: str) -> str:
  if impl == 'auto':
    return 'shifted' if cpu_tuned() else 'xla'
  if impl not in ('xla', 'shifted'):
    raise ValueError(f"depthwise must be 'auto', 'xla' or 'shifted', got {impl!r}")
  return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1,
                   impl: str = 'auto') -> jax.Array:
  """Depthwise 'SAME' convolution of NHWC `x` with an HWIO kernel [k, k, 1, C].

  'xla' is the grouped convolution (right on GPU/TPU). 'shifted' sums k*k
  strided slices times per-channel weights, with its own backward pass
  (`_shifted_depthwise_bwd`): XLA:CPU runs the grouped conv and especially its
  kernel gradient (done as a dense C x C convolution) far slower.
  The k*k terms are a static unroll, traced once.
  """
  k, _, _, c = kernel.shape
  if x.shape[-1] != c:
    raise ValueError(f'depthwise kernel has {c} channels but the input has {x.shape[-1]}')
  impl = resolve_depthwise(impl)
  if impl == 'xla':
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
  return _shifted_depthwise(x, kernel, stride, x.shape[1:3])


def _window(xp: jax.Array, i: int, j: int, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  (oh, ow), b, c = out_hw, xp.shape[0], xp.shape[-1]
  return lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                   (1, stride, stride, 1))


def _padded(x: jax.Array, k: int, stride: int) -> tuple[jax.Array, tuple, tuple]:
  ph, pw = same_pads(x.shape[1], k, stride), same_pads(x.shape[2], k, stride)
  return jnp.pad(x, ((0, 0), ph, pw, (0, 0))), ph, pw


def _shifted_sum(xp: jax.Array, kernel: jax.Array, stride: int, out_hw: tuple[int, int]) -> jax.Array:
  """sum_ij xp[:, y*s + i, x*s + j] * kernel[i, j]: one fused loop over the output on XLA:CPU (a static unroll)."""
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      term = _window(xp, i, j, stride, out_hw) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int, in_hw: tuple[int, int]) -> jax.Array:
  return _shifted_depthwise_fwd(x, kernel, stride, in_hw)[0]


def _shifted_depthwise_fwd(x, kernel, stride, in_hw):
  del in_hw  # x.shape[1:3]; the backward's input size (the padded input it keeps does not tell it).
  # The backward keeps the padded input, the pad's only copy: the producer (batch norm + activation) then fuses
  # into the pad, one pass that writes it, instead of a copy for the backward and a second pass for the pad.
  xp, _, _ = _padded(x, kernel.shape[0], stride)
  out_hw = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
  return _shifted_sum(xp, kernel, stride, out_hw), (xp, kernel)


def _kernel_grad(xp: jax.Array, g: jax.Array, k: int, stride: int) -> jax.Array:
  """dk[i, j, c] = sum over batch and output pixels of window_ij(xp) * g. A reduce of each window would write
  the window out first (XLA:CPU hands reduces to a library that cannot take a slice), so the sum over the
  batch x output rows is first an unrolled add of up to 8 slices of them in one fused loop per window, and only
  the 1/8-size partials are reduced. The slices run over the rows as well as the batch: the Fisher's per-example
  gradients see a batch of one."""
  b, oh = g.shape[:2]
  u = max(d for d in range(1, 9) if (b * oh) % d == 0)
  windows = [_window(xp, i, j, stride, g.shape[1:3]) for i in range(k) for j in range(k)]
  split = lambda t: t.reshape((u, b * oh // u) + t.shape[2:])
  gs, partials = split(g), []
  for w in map(split, windows):
    acc = w[0] * gs[0]
    for n in range(1, u):
      acc = acc + w[n] * gs[n]
    partials.append(acc)
  return jnp.sum(jnp.stack(partials), axis=(1, 2))


def _shifted_depthwise_bwd(stride, in_hw, residuals, g):
  """Autodiff of the slices would keep k*k activation-sized windows and sum k*k padded copies for the input
  gradient. Instead: the input gradient is the stride-1 shifted sum of g (dilated by the stride, padded) with the
  flipped kernel, one fused loop like the forward; the kernel gradient is `_kernel_grad`."""
  xp, kernel = residuals
  k, (h, w), (oh, ow) = kernel.shape[0], in_hw, g.shape[1:3]
  ph, pw = same_pads(h, k, stride), same_pads(w, k, stride)
  gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (k - 1 - ph[0], h + ph[0] - (oh - 1) * stride - 1, stride - 1),
                                           (k - 1 - pw[0], w + pw[0] - (ow - 1) * stride - 1, stride - 1), (0, 0, 0)))
  dx = _shifted_sum(gp, kernel[::-1, ::-1], 1, (h, w))
  return dx, _kernel_grad(xp, g, k, stride).reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


# He-normal on fan-in (= k*k) for depthwise kernels (TF EfficientNet).
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


class DepthwiseConv(nn.Module):
  """Depthwise convolution whose kernel [k, k, 1, C] is shared by both implementations."""
  kernel_size: int
  strides: int = 1
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, out_scale=None):
    kernel = self.param('kernel', depthwise_init, (self.kernel_size, self.kernel_size, 1, x.shape[-1]))
    return depthwise_conv(x, _scaled(kernel, out_scale), self.strides, self.impl)


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel over the channel axis, with its kernel gradient as one 2-D dot over the flattened pixels: autodiff's
  N-D dot_general contracting batch and space made XLA:CPU write the cotangent out transposed first (B0 block 1:
  a 38 MB transposed copy; the block's fwd + bwd 1.6x slower)."""
  return x @ kernel


def _pointwise_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _pixel_dot(x: jax.Array, g: jax.Array) -> jax.Array:
  """[in, out] = sum over every leading (batch, pixel) index of x[..., in] * g[..., out], as one 2-D dot."""
  rows = lambda t: t.reshape(-1, t.shape[-1])
  return lax.dot_general(rows(x), rows(g), (((0,), (0,)), ((), ())))


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  return (g @ kernel.T).astype(x.dtype), _pixel_dot(x, g).astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nn.Module):
  """1x1 convolution as a matmul over the channel axis, with nn.Conv's parameters ('kernel' [1, 1, in, out],
  'bias') and initialisers, so weights and checkpoints are interchangeable with it. XLA:CPU runs the dot and its
  gradients 1.5-8x faster than the same convolution (EfficientNet-B0 shapes, batch 8). The custom kernel gradient
  (`pointwise`) on CPU only; elsewhere the plain matmul."""
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, out_scale=None):
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
    y = (pointwise if cpu_tuned() else jnp.matmul)(x, _scaled(kernel, out_scale)[0, 0])
    if self.use_bias:
      y = y + _scaled(self.param('bias', self.bias_init, (self.features,)), out_scale)
    return y


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  k = kernel.shape[0]
  pads = (same_pads(x.shape[1], k, stride), same_pads(x.shape[2], k, stride))
  return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Dense 'SAME' convolution of NHWC `x` with an HWIO kernel [k, k, in, out] (as nn.Conv's 'SAME') as one matmul
  of the k*k windows stacked on the channel axis (im2col), whose kernel gradient is one 2-D dot of the same windows
  with the cotangent. One dot per tap ran at half a matmul's speed and copied each window out first (B0 + 3 heads,
  224 px, batch 8, same process: steps 2-3% faster, det 0.563 -> 0.547 s). Autodiff's kernel gradient is a
  convolution over the batch; under the Fisher's vmap it became a grouped convolution, one group per example, which
  took half of the det head's Fisher."""
  return _conv_fwd(x, kernel, stride)[0]


def _patches(x: jax.Array, k: int, stride: int) -> jax.Array:
  """[B, out_h, out_w, k*k*in]: the 'SAME' window of every output pixel, tap-major as kernel.reshape(-1, out)."""
  xp, _, _ = _padded(x, k, stride)
  out_hw = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
  return jnp.concatenate([_window(xp, i, j, stride, out_hw) for i in range(k) for j in range(k)], axis=-1)


def _conv_fwd(x, kernel, stride):
  patches = _patches(x, kernel.shape[0], stride)
  return patches @ kernel.reshape(-1, kernel.shape[-1]), (x, patches, kernel)


def _input_grad(x: jax.Array, kernel: jax.Array, stride: int, g: jax.Array) -> jax.Array:
  """The cotangent of `_conv`'s input. Stride 1 (every head's conv) writes it out as the convolution of g with the
  flipped, in/out-swapped kernel (the 'SAME' pads swapped). Autodiff's transposed convolution is the same maths, but
  under the Fisher's vmap XLA:CPU kept its kernel as 'oi' and ran it ~2x slower than the 'io' form a batched step
  gets (det head: four of these convolutions were 30% of the Fisher's time)."""
  if stride != 1:
    return jax.vjp(lambda x: _conv(x, kernel, stride), x)[1](g)[0]
  k = kernel.shape[0]
  (top, _), (left, _) = same_pads(x.shape[1], k, 1), same_pads(x.shape[2], k, 1)
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  return lax.conv_general_dilated(g, flipped, (1, 1), ((k - 1 - top, top), (k - 1 - left, left)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_bwd(stride, residuals, g):
  x, patches, kernel = residuals
  dx = _input_grad(x, kernel, stride, g).astype(x.dtype)
  return dx, _pixel_dot(patches, g).reshape(kernel.shape).astype(kernel.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
  """k x k 'SAME' convolution with nn.Conv's parameters ('kernel' [k, k, in, out], 'bias') and initialisers:
  `conv` on CPU; elsewhere the plain convolution and its autodiff (cuDNN / TPU convolutions need no help)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, out_scale=None):
    k = self.kernel_size
    kernel = _scaled(self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features)), out_scale)
    y = (conv if cpu_tuned() else _conv)(x, kernel, self.strides)
    if self.use_bias:
      y = y + _scaled(self.param('bias', self.bias_init, (self.features,)), out_scale)
    return y
