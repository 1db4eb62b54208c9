"""FPN neck, the three task heads, and CenterNet target encoding / decoding.

Detection is CenterNet ("Objects as Points"): per class a heatmap of object
centres at stride `DET_STRIDE`, plus per cell the box size (in cells) and the
sub-cell offset of the centre, both in (y, x) order.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clflax.models.convs import Conv
from clflax.models.convs import DepthwiseConv
from clflax.models.convs import PointwiseConv

DET_STRIDE = 8
HEATMAP_PRIOR = 0.1  # CenterNet: the heatmap starts at sigmoid(bias) = 0.1.


def _upsample_axis(x, factor, axis):
  """Bilinear x`factor` along `axis` (half-pixel centres, edge clamp): 2 taps per output."""
  n = x.shape[axis]
  x_pad = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
  prev, here, nxt = (jax.lax.slice_in_dim(x_pad, i, i + n, axis=axis) for i in range(3))
  phases = []
  for r in range(factor):
    d = (2 * r + 1 - factor) / (2 * factor)  # Source offset of output r within its cell.
    phases.append((1 - abs(d)) * here + abs(d) * (prev if d < 0 else nxt))
  out = jnp.stack(phases, axis=axis + 1)
  return out.reshape(x.shape[:axis] + (n * factor,) + x.shape[axis + 1:])


def upsample(x, hw, method='bilinear'):
  """Resizes NHWC `x` to spatial `hw`, like `jax.image.resize` (half-pixel centres).

  Integer factors take a direct path (repeat, or 2-tap bilinear): `jax.image.resize`
  builds dense interpolation matrices, which cost the full-resolution seg output
  and its gradient several times more on CPU.
  """
  h, w = x.shape[1:3]
  if hw[0] % h or hw[1] % w or method not in ('nearest', 'bilinear'):
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), method)
  for axis, factor in ((1, hw[0] // h), (2, hw[1] // w)):
    if factor > 1:
      x = jnp.repeat(x, factor, axis=axis) if method == 'nearest' else _upsample_axis(x, factor, axis)
  return x


def _resize_to(x, like, method):
  return upsample(x, like.shape[1:3], method)


class FPN(nn.Module):
  """Lateral 1x1 + top-down nearest upsample-add + 3x3 smoothing over strides 8/16/32."""
  channels: int = 64

  @nn.compact
  def __call__(self, features):
    p = PointwiseConv(self.channels, name='lateral_32')(features[32])
    outs = {32: p}
    for s in (16, 8):
      lateral = PointwiseConv(self.channels, name=f'lateral_{s}')(features[s])
      p = lateral + _resize_to(p, lateral, 'nearest')
      outs[s] = p
    return {s: Conv(self.channels, 3, name=f'smooth_{s}')(outs[s]) for s in (8, 16, 32)}


class SegHead(nn.Module):
  """Panoptic-FPN-style merge at stride 8, refined at stride 4 with the backbone's C2.

  The stride-4 step runs at half the neck width with one depthwise-separable
  conv: on CPU it costs about as much as the whole stride-8 part, and sharpens
  the mask edges that a x8 upsample of a stride-8 prediction would blur.
  """
  num_classes: int = 21
  channels: int = 64
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, pyramid, c4, out_hw):
    fine = max(self.channels // 2, 8)
    x = pyramid[8] + _resize_to(pyramid[16], pyramid[8], 'bilinear') \
        + _resize_to(pyramid[32], pyramid[8], 'bilinear')
    x = nn.relu(Conv(self.channels, 3, name='merge')(x))
    x = PointwiseConv(fine, name='reduce')(x)
    x = _resize_to(x, c4, 'bilinear') + PointwiseConv(fine, name='lateral_4')(c4)
    x = DepthwiseConv(3, impl=self.depthwise, name='refine_dw')(nn.relu(x))
    x = nn.relu(PointwiseConv(fine, name='refine_pw')(x))
    x = PointwiseConv(self.num_classes, name='logits')(x)
    return upsample(x, tuple(out_hw))


class DetHead(nn.Module):
  """CenterNet branches on the stride-8 FPN level: conv3x3-ReLU-conv1x1 each.

  With `image_head`, also `image` [B, C] logits of which classes the image contains (global average pool of the
  backbone's top features, Dense), trained with a multi-label loss: the seed's "detection as multi-label" metric
  (image-level mAP) then has a head of its own instead of the max of a heatmap that learns far more slowly.
  """
  num_classes: int = 80
  channels: int = 64
  image_head: bool = False

  @nn.compact
  def __call__(self, p8, top=None):
    prior_bias = float(-np.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))  # -2.19
    out = {}
    for name, dim in (('heatmap', self.num_classes), ('size', 2), ('offset', 2)):
      h = nn.relu(Conv(self.channels, 3, name=f'{name}_conv')(p8))
      bias_init = nn.initializers.constant(prior_bias) if name == 'heatmap' else nn.initializers.zeros
      out[name] = PointwiseConv(dim, bias_init=bias_init, name=f'{name}_out')(h)
    if self.image_head:
      if top is None:
        raise ValueError('DetHead(image_head=True) needs the backbone top features')
      out['image'] = nn.Dense(self.num_classes, bias_init=nn.initializers.constant(prior_bias),
                              name='image_out')(jnp.mean(top, axis=(1, 2)))
    return out


class ClsHead(nn.Module):
  """Global average pool of the top features, dropout, Dense."""
  num_classes: int = 10
  dropout: float = 0.2

  @nn.compact
  def __call__(self, top, train: bool):
    x = jnp.mean(top, axis=(1, 2))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name='logits')(x)


def gaussian_radius(height, width, min_overlap=0.7):
  """CenterNet's radius rule (as in its reference code): the smallest of three
  corner-shift radii keeping IoU >= min_overlap, for boxes of height x width cells."""
  b1 = height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + jnp.sqrt(b1 ** 2 - 4 * c1)) / 2
  b2 = 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + jnp.sqrt(b2 ** 2 - 16 * c2)) / 2
  a3 = 4 * min_overlap
  b3 = -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + jnp.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
  return jnp.minimum(jnp.minimum(r1, r2), r3)


def output_size(image_size, stride=DET_STRIDE):
  """The detection map's (h, w): ceil(image / stride), as 'SAME' stride-2 convs give."""
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  return tuple(-(-int(s) // stride) for s in image_size)


def encode_targets(boxes, classes, box_valid, image_size, num_classes=80, stride=DET_STRIDE):
  """CenterNet training targets for boxes [B, M, 4] (ymin, xmin, ymax, xmax) in pixels.

  Returns heatmap [B, h, w, C] (a Gaussian per object around its centre cell,
  peak 1 there, max over objects of a class), and per box: size [B, M, 2]
  (height, width in cells), offset [B, M, 2] (centre minus its cell, in [0, 1)),
  index [B, M] (flat cell y * w + x) and valid [B, M]. Fixed shapes, jittable.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  classes = jnp.asarray(classes, jnp.int32)
  valid = jnp.asarray(box_valid, bool)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be [B, M, 4], got shape {boxes.shape}')
  if classes.shape != boxes.shape[:2] or valid.shape != boxes.shape[:2]:
    raise ValueError(f'classes {classes.shape} and box_valid {valid.shape} must be {boxes.shape[:2]}')
  h, w = output_size(image_size, stride)
  cells = boxes / stride
  size = cells[..., 2:] - cells[..., :2]
  valid = valid & jnp.all(size > 0, axis=-1)
  center = (cells[..., :2] + cells[..., 2:]) / 2
  cell = jnp.clip(jnp.floor(center), 0, jnp.asarray([h - 1, w - 1], jnp.float32))
  offset = center - cell
  cell = cell.astype(jnp.int32)
  radius = jnp.floor(gaussian_radius(jnp.ceil(size[..., 0]), jnp.ceil(size[..., 1])))
  radius = jnp.maximum(radius, 0.0)
  sigma = (2 * radius + 1) / 6
  dy = jnp.arange(h)[None, None, :] - cell[..., 0, None]  # [B, M, h]
  dx = jnp.arange(w)[None, None, :] - cell[..., 1, None]  # [B, M, w]
  inside = (jnp.abs(dy)[..., :, None] <= radius[..., None, None]) & \
           (jnp.abs(dx)[..., None, :] <= radius[..., None, None])
  gauss = jnp.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma[..., None, None] ** 2))
  gauss = jnp.where(inside & valid[..., None, None], gauss, 0.0)  # [B, M, h, w]
  # Max over the objects of each class; invalid boxes go to a dropped extra class.
  segment = jnp.where(valid, jnp.clip(classes, 0, num_classes - 1), num_classes)
  per_class = jax.vmap(lambda g, s: jax.ops.segment_max(g, s, num_segments=num_classes + 1))(gauss, segment)
  heatmap = jnp.maximum(per_class[:, :num_classes], 0.0).transpose(0, 2, 3, 1)
  zero = jnp.zeros_like(size)
  return {
      'heatmap': heatmap,
      'size': jnp.where(valid[..., None], size, zero),
      'offset': jnp.where(valid[..., None], offset, zero),
      'index': jnp.where(valid, cell[..., 0] * w + cell[..., 1], 0).astype(jnp.int32),
      'valid': valid,
  }


def decode_detections(det_out, max_detections=100, stride=DET_STRIDE):
  """Top-K boxes from the det head: 3x3 max-pool peaks, top-K over cells x classes.

  Returns boxes [B, K, 4] (ymin, xmin, ymax, xmax) in pixels, scores [B, K]
  (sigmoid) and classes [B, K] int32, best first.
  """
  heat = jax.nn.sigmoid(det_out['heatmap'])
  b, h, w, c = heat.shape
  k = min(max_detections, h * w * c)
  peaks = nn.max_pool(heat, (3, 3), strides=(1, 1), padding='SAME')
  heat = jnp.where(heat == peaks, heat, 0.0)
  scores, flat = jax.lax.top_k(heat.reshape(b, h * w * c), k)
  cls, cell = flat % c, flat // c
  size = jnp.take_along_axis(det_out['size'].reshape(b, h * w, 2), cell[..., None], axis=1)
  offset = jnp.take_along_axis(det_out['offset'].reshape(b, h * w, 2), cell[..., None], axis=1)
  center = jnp.stack([cell // w, cell % w], axis=-1).astype(jnp.float32) + offset
  half = jnp.maximum(size, 0.0) / 2
  boxes = jnp.concatenate([center - half, center + half], axis=-1) * stride
  return {'boxes': boxes, 'scores': scores, 'classes': cls.astype(jnp.int32)}


def image_level_scores(det_out):
  """[B, C] per-image class scores: the image branch's probabilities, else the max heatmap probability over space."""
  if 'image' in det_out:
    return jax.nn.sigmoid(det_out['image'])
  return jax.nn.sigmoid(jnp.max(det_out['heatmap'], axis=(1, 2)))
