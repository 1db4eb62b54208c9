"""EfficientNet B0-B7, Lite0-Lite4 and a tiny test variant as Flax linen modules.

Follows the TF reference (and lukemelas' PyTorch port, whose parameter layout
`pretrained.py` reads): TF "SAME" padding (odd padding goes to the bottom/right),
BatchNorm momentum 0.99 / epsilon 1e-3, drop-connect growing linearly with the
block index. Lite variants use ReLU6, no squeeze-excite, and keep the stem, the
head and the first/last stage's repeats unscaled.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class StageSpec(NamedTuple):
  """One stage of MBConv blocks (the first block carries the stride)."""
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int
  se_ratio: float  # 0 disables squeeze-excite.


class VariantSpec(NamedTuple):
  """A fully resolved architecture (filters and repeats already scaled)."""
  stages: tuple[StageSpec, ...]
  stem_ch: int
  head_ch: int
  resolution: int
  dropout: float
  lite: bool  # ReLU6 and (x - 127) / 128 inputs; else swish and ImageNet mean/std.


# (repeats, kernel, stride, expand, in, out); the same base for B and Lite.
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320))

# name: (width, depth, resolution, dropout) -- the standard compound coefficients.
_COEFFICIENTS = {
    'b0': (1.0, 1.0, 224, 0.2), 'b1': (1.0, 1.1, 240, 0.2),
    'b2': (1.1, 1.2, 260, 0.3), 'b3': (1.2, 1.4, 300, 0.3),
    'b4': (1.4, 1.8, 380, 0.4), 'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5), 'b7': (2.0, 3.1, 600, 0.5),
    'lite0': (1.0, 1.0, 224, 0.2), 'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3), 'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}

# Narrow and shallow, but with every feature the big ones have (SE, a repeated
# stage with residual + drop-connect, kernels 3 and 5, strides 4..32).
_TINY = VariantSpec(
    stages=(StageSpec(1, 3, 1, 1, 8, 8, 0.25), StageSpec(1, 3, 2, 3, 8, 12, 0.25),
            StageSpec(2, 5, 2, 3, 12, 16, 0.25), StageSpec(1, 3, 2, 3, 16, 24, 0.25),
            StageSpec(1, 3, 2, 3, 24, 24, 0.25)),
    stem_ch=8, head_ch=32, resolution=64, dropout=0.2, lite=False)

VARIANTS = tuple(_COEFFICIENTS) + ('tiny',)

# Per-channel input statistics, in [0, 255] pixel units.
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by `width`, rounding to a multiple of `divisor`."""
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:  # Never round down by more than 10%.
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def variant_spec(variant: str) -> VariantSpec:
  """Resolves a variant name into its scaled architecture."""
  if variant == 'tiny':
    return _TINY
  if variant not in _COEFFICIENTS:
    raise ValueError(f'unknown EfficientNet variant {variant!r}; expected one of {VARIANTS}')
  width, depth, resolution, dropout = _COEFFICIENTS[variant]
  lite = variant.startswith('lite')
  last = len(_BASE_STAGES) - 1
  stages = []
  for i, (r, k, s, e, cin, cout) in enumerate(_BASE_STAGES):
    fixed = lite and i in (0, last)  # Lite keeps the first/last stage depth.
    stages.append(StageSpec(
        repeats=r if fixed else round_repeats(r, depth), kernel=k, stride=s, expand=e,
        in_ch=32 if (lite and i == 0) else round_filters(cin, width),
        out_ch=round_filters(cout, width), se_ratio=0.0 if lite else 0.25))
  stem = 32 if lite else round_filters(32, width)
  head = 1280 if lite else round_filters(1280, width)
  return VariantSpec(tuple(stages), stem, head, resolution, dropout, lite)


def normalize(images: jax.Array, variant: str) -> jax.Array:
  """Maps [0, 255] RGB pixels (uint8 or float) to the input the variant expects."""
  x = jnp.asarray(images).astype(jnp.float32)
  if variant_spec(variant).lite:
    return (x - 127.0) / 128.0
  return (x - jnp.asarray(_IMAGENET_MEAN)) / jnp.asarray(_IMAGENET_STD)


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding of one axis: output ceil(size / stride), odd pad at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def resolve_depthwise(impl: str) -> str:
  if impl == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'xla'
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
  return _shifted_depthwise(x, kernel, stride)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _shifted_depthwise_fwd(x, kernel, stride)[0]


def _shifted_depthwise_fwd(x, kernel, stride):
  # The barrier keeps XLA from fusing the producer (batch norm + activation) into the pad: it would compute it
  # a second time for the pad copy, beside the copy it keeps for the backward (B0 cls step 0.63 -> 0.58 s).
  xp, _, _ = _padded(lax.optimization_barrier(x), kernel.shape[0], stride)
  out_hw = (-(-x.shape[1] // stride), -(-x.shape[2] // stride))
  return _shifted_sum(xp, kernel, stride, out_hw), (x, kernel)


def _kernel_grad(xp: jax.Array, g: jax.Array, k: int, stride: int) -> jax.Array:
  """dk[i, j, c] = sum over batch and output pixels of window_ij(xp) * g. A reduce of each window would write
  the window out first (XLA:CPU hands reduces to a library that cannot take a slice), so the batch sum is an
  unrolled add in one fused loop per window (up to 8 batch slices) and only the 1/8-size partials are reduced."""
  b = g.shape[0]
  u = max(d for d in range(1, min(b, 8) + 1) if b % d == 0)
  windows = [_window(xp, i, j, stride, g.shape[1:3]) for i in range(k) for j in range(k)]
  if u == 1:  # One example: nothing to pre-sum.
    return jnp.stack([jnp.sum(w * g, axis=(0, 1, 2)) for w in windows])
  split = lambda t: t.reshape((u, b // u) + t.shape[1:])
  gs, partials = split(g), []
  for w in map(split, windows):
    acc = w[0] * gs[0]
    for n in range(1, u):
      acc = acc + w[n] * gs[n]
    partials.append(acc)
  return jnp.sum(jnp.stack(partials), axis=(1, 2, 3))


def _shifted_depthwise_bwd(stride, residuals, g):
  """Autodiff of the slices would keep k*k activation-sized windows and sum k*k padded copies for the input
  gradient. Instead: the input gradient is the stride-1 shifted sum of g (dilated by the stride, padded) with the
  flipped kernel, one fused loop like the forward; the kernel gradient is `_kernel_grad`."""
  x, kernel = residuals
  k, (_, h, w, _), (oh, ow) = kernel.shape[0], x.shape, g.shape[1:3]
  xp, ph, pw = _padded(x, k, stride)
  gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (k - 1 - ph[0], h + ph[0] - (oh - 1) * stride - 1, stride - 1),
                                           (k - 1 - pw[0], w + pw[0] - (ow - 1) * stride - 1, stride - 1), (0, 0, 0)))
  dx = _shifted_sum(gp, kernel[::-1, ::-1], 1, (h, w))
  return dx, _kernel_grad(xp, g, k, stride).reshape(kernel.shape).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


# He-normal on fan-out for dense convs (TF EfficientNet); fan-in (= k*k) for depthwise.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


class DepthwiseConv(nn.Module):
  """Depthwise convolution whose kernel [k, k, 1, C] is shared by both implementations."""
  kernel_size: int
  strides: int = 1
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', depthwise_init, (self.kernel_size, self.kernel_size, 1, x.shape[-1]))
    return depthwise_conv(x, kernel, self.strides, self.impl)


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x @ kernel over the channel axis, with its kernel gradient as one 2-D dot over the flattened pixels: autodiff's
  N-D dot_general contracting batch and space made XLA:CPU write the cotangent out transposed first (B0 block 1:
  a 38 MB transposed copy; the block's fwd + bwd 1.6x slower)."""
  return x @ kernel


def _pointwise_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  rows = lambda t: t.reshape(-1, t.shape[-1])
  dk = lax.dot_general(rows(x), rows(g), (((0,), (0,)), ((), ())))
  return (g @ kernel.T).astype(x.dtype), dk.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nn.Module):
  """1x1 convolution as a matmul over the channel axis, with nn.Conv's parameters ('kernel' [1, 1, in, out],
  'bias') and initialisers, so weights and checkpoints are interchangeable with it. XLA:CPU runs the dot and its
  gradients 1.5-8x faster than the same convolution (EfficientNet-B0 shapes, batch 8)."""
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
    y = pointwise(x, kernel[0, 0])
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,))
    return y


def _conv1x1(features, name, use_bias=False):
  return PointwiseConv(features, use_bias=use_bias, kernel_init=conv_init, name=name)


def _bn(train, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)


class MBConv(nn.Module):
  """Inverted residual block: expand 1x1, depthwise kxk, (SE), project 1x1."""
  kernel: int
  stride: int
  expand: int
  out_ch: int
  se_ch: int  # Squeeze width; 0 disables SE.
  lite: bool
  drop_rate: float
  depthwise: str = 'auto'
  frozen_bn: bool = False  # Batch norm always on its running statistics (and never updates them).

  @nn.compact
  def __call__(self, inputs, train: bool):
    act = jax.nn.relu6 if self.lite else jax.nn.silu
    bn_train = train and not self.frozen_bn
    x = inputs
    mid = inputs.shape[-1] * self.expand
    if self.expand != 1:
      x = act(_bn(bn_train, 'expand_bn')(_conv1x1(mid, 'expand_conv')(x)))
    x = DepthwiseConv(self.kernel, self.stride, self.depthwise, name='depthwise_conv')(x)
    x = act(_bn(bn_train, 'depthwise_bn')(x))
    if self.se_ch:
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = act(PointwiseConv(self.se_ch, kernel_init=conv_init, name='se_reduce')(s))
      s = PointwiseConv(mid, kernel_init=conv_init, name='se_expand')(s)
      x = x * jax.nn.sigmoid(s)
    x = _bn(bn_train, 'project_bn')(_conv1x1(self.out_ch, 'project_conv')(x))
    if self.stride == 1 and inputs.shape[-1] == self.out_ch:
      # Drop-connect: drop the whole residual branch per example.
      x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3))(x, deterministic=not train)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """EfficientNet backbone; input is already normalised (see `normalize`).

  Returns {4: ..., 8: ..., 16: ..., 32: ...}: the output of the last block at
  each stride, stride 32 being the 1x1 head conv ("top") features. With
  `include_top=True` it returns only the classifier logits [B, num_classes].
  """
  variant: str = 'lite0'
  include_top: bool = False
  num_classes: int = 1000
  depthwise: str = 'auto'
  drop_connect_rate: float = 0.2
  dropout_rate: float | None = None  # None: the variant's own rate.
  # Batch norm on the (pretrained) running statistics in training too, never updating them: small batches then
  # cannot overwrite ImageNet statistics, nor one task's images the statistics earlier tasks rely on.
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = variant_spec(self.variant)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'EfficientNet expects [B, H, W, 3] images, got shape {x.shape}')
    act = jax.nn.relu6 if spec.lite else jax.nn.silu
    x = nn.Conv(spec.stem_ch, (3, 3), (2, 2), padding='SAME', use_bias=False,
                kernel_init=conv_init, name='stem_conv')(x)
    bn_train = train and not self.frozen_bn
    x = act(_bn(bn_train, 'stem_bn')(x))
    total = sum(s.repeats for s in spec.stages)
    features, stride, idx = {}, 2, 0
    for stage in spec.stages:
      for r in range(stage.repeats):
        block_stride = stage.stride if r == 0 else 1
        in_ch = stage.in_ch if r == 0 else stage.out_ch
        x = MBConv(stage.kernel, block_stride, stage.expand, stage.out_ch,
                   se_ch=max(1, int(in_ch * stage.se_ratio)) if stage.se_ratio else 0,
                   lite=spec.lite, drop_rate=self.drop_connect_rate * idx / total,
                   depthwise=self.depthwise, frozen_bn=self.frozen_bn, name=f'blocks_{idx}')(x, train)
        idx += 1
      stride *= stage.stride
      features[stride] = x  # A later stage at the same stride overwrites.
    x = act(_bn(bn_train, 'head_bn')(_conv1x1(spec.head_ch, 'head_conv')(x)))
    features[stride] = x
    if not self.include_top:
      return {s: features[s] for s in (4, 8, 16, 32)}
    x = jnp.mean(x, axis=(1, 2))
    rate = spec.dropout if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name='classifier')(x)
