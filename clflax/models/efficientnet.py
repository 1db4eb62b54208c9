"""EfficientNet B0-B7, Lite0-Lite4 and a tiny test variant as Flax linen modules.

Follows the TF reference (and lukemelas' PyTorch port, whose parameter layout
`pretrained.py` reads): TF "SAME" padding (odd padding goes to the bottom/right),
BatchNorm momentum 0.99 / epsilon 1e-3, drop-connect growing linearly with the
block index. Lite variants use ReLU6, no squeeze-excite, and keep the stem, the
head and the first/last stage's repeats unscaled.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clflax.models.convs import Conv
from clflax.models.convs import DepthwiseConv
from clflax.models.convs import PointwiseConv
from clflax.models.norm import ACTIVATIONS
from clflax.models.norm import FrozenBatchNorm
from clflax.models.norm import bias_act


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


# He-normal on fan-out for dense convs (TF EfficientNet).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')


def _conv1x1(features, name, use_bias=False):
  return PointwiseConv(features, use_bias=use_bias, kernel_init=conv_init, name=name)


def _conv_bn_act(conv: nn.Module, x: jax.Array, channels: int, train: bool, name: str, act: str) -> jax.Array:
  """act(batch_norm_`name`(conv(x))). On running statistics (inference, frozen_bn) the norm's scale folds into
  conv's kernel and its shift joins the activation (clflax.models.norm: the same variables, fewer passes over
  memory); training statistics need nn.BatchNorm after the conv."""
  if train:
    return ACTIVATIONS[act](nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-3, name=name)(conv(x)))
  a, b = FrozenBatchNorm(epsilon=1e-3, name=name)(channels)
  return bias_act(conv(x, out_scale=a), b, act)


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
    act = 'relu6' if self.lite else 'silu'
    bn_train = train and not self.frozen_bn
    x = inputs
    mid = inputs.shape[-1] * self.expand
    if self.expand != 1:
      x = _conv_bn_act(_conv1x1(mid, 'expand_conv'), x, mid, bn_train, 'expand_bn', act)
    depthwise = DepthwiseConv(self.kernel, self.stride, self.depthwise, name='depthwise_conv')
    x = _conv_bn_act(depthwise, x, mid, bn_train, 'depthwise_bn', act)
    if self.se_ch:
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = ACTIVATIONS[act](PointwiseConv(self.se_ch, kernel_init=conv_init, name='se_reduce')(s))
      s = PointwiseConv(mid, kernel_init=conv_init, name='se_expand')(s)
      x = x * jax.nn.sigmoid(s)
    x = _conv_bn_act(_conv1x1(self.out_ch, 'project_conv'), x, self.out_ch, bn_train, 'project_bn', 'linear')
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
    act = 'relu6' if spec.lite else 'silu'
    bn_train = train and not self.frozen_bn
    stem = Conv(spec.stem_ch, 3, 2, use_bias=False, kernel_init=conv_init, name='stem_conv')
    x = _conv_bn_act(stem, x, spec.stem_ch, bn_train, 'stem_bn', act)
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
    x = _conv_bn_act(_conv1x1(spec.head_ch, 'head_conv'), x, spec.head_ch, bn_train, 'head_bn', act)
    features[stride] = x
    if not self.include_top:
      return {s: features[s] for s in (4, 8, 16, 32)}
    x = jnp.mean(x, axis=(1, 2))
    rate = spec.dropout if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name='classifier')(x)
