"""The shared-backbone multi-task network: EfficientNet + FPN + seg / det / cls heads."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clflax.models import heads as heads_lib
from clflax.models import pretrained
from clflax.models.efficientnet import EfficientNet, normalize

# 'detect' runs the det head and decodes it (boxes, scores, classes, image_scores).
TASKS = ('seg', 'det', 'cls', 'detect')


class MultiTaskNet(nn.Module):
  """`apply(variables, images, task=..., train=...)` with images [B, H, W, 3] in [0, 255].

  The variant's input normalisation happens inside, so data pipelines hand over
  raw pixels (uint8 or float). Only the requested head runs, except at init,
  which creates every head's parameters.
  """
  backbone: str = 'lite0'
  num_seg_classes: int = 21
  num_det_classes: int = 80
  num_cls_classes: int = 10
  neck_channels: int = 64
  depthwise: str = 'auto'
  dropout: float = 0.2
  max_detections: int = 100
  drop_connect_rate: float = 0.2
  frozen_bn: bool = False  # The backbone's batch norm on its running statistics, also in training.
  det_image_head: bool = False  # The det head's image-level multi-label branch (see heads.DetHead).
  # One FPN neck for seg and det, or one each ('seg_neck', 'det_neck'): trained in sequence, a shared neck is
  # rewritten by the later task and the earlier head reads features it was never trained on.
  shared_neck: bool = True
  # Computation dtype (flax's convention): the normalised input and, cast by the trainer's forward pass
  # (trainer/steps.py), the parameters; bfloat16 runs every convolution and matmul in it.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, task: str = 'cls', train: bool = False):
    if task not in TASKS:
      raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'MultiTaskNet expects [B, H, W, 3] images, got shape {images.shape}')
    feats = EfficientNet(self.backbone, depthwise=self.depthwise,
                         drop_connect_rate=self.drop_connect_rate, frozen_bn=self.frozen_bn,
                         name='backbone')(normalize(images, self.backbone).astype(self.dtype), train)
    every = self.is_initializing()
    out = {}
    if task == 'cls' or every:
      out['cls'] = heads_lib.ClsHead(self.num_cls_classes, self.dropout, name='cls_head')(feats[32], train)
    if task != 'cls' or every:
      shared = heads_lib.FPN(self.neck_channels, name='neck')(feats) if self.shared_neck else None
      neck = lambda head: shared or heads_lib.FPN(self.neck_channels, name=f'{head}_neck')(feats)  # noqa: E731
      if task == 'seg' or every:
        out['seg'] = heads_lib.SegHead(self.num_seg_classes, self.neck_channels, self.depthwise,
                                       name='seg_head')(neck('seg'), feats[4], images.shape[1:3])
      if task in ('det', 'detect') or every:
        out['det'] = heads_lib.DetHead(self.num_det_classes, self.neck_channels, self.det_image_head,
                                       name='det_head')(neck('det')[8], feats[32])
    if task == 'detect':
      det = out['det']
      return {**heads_lib.decode_detections(det, self.max_detections),
              'image_scores': heads_lib.image_level_scores(det)}
    return out[task]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model, key, shape):
  # Jitted and cached per (model, shape): eager init dispatches op by op, which is far slower.
  params_key, dropout_key = jax.random.split(key)
  return model.init({'params': params_key, 'dropout': dropout_key}, jnp.zeros(shape, jnp.float32),
                    task='cls', train=False)


def init_variables(model: MultiTaskNet, key: jax.Array, image_size, pretrained_path=None,
                   cls_wnids=None) -> dict[str, Any]:
  """All heads' variables; with `pretrained_path` ('default' or a .pth path) the backbone sub-tree is overwritten by
  the ImageNet weights, and with `cls_wnids` (the classification classes' WordNet ids) the classification head by
  those classes' rows of the ImageNet classifier."""
  if cls_wnids:  # Refused before any init or weight file read.
    if pretrained_path is None:
      raise ValueError('an ImageNet-initialised classification head needs the pretrained backbone')
    if len(cls_wnids) != model.num_cls_classes:
      raise ValueError(f'{len(cls_wnids)} class ids for a {model.num_cls_classes}-way classification head')
    pretrained.imagenet_index(cls_wnids)
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  variables = _init(model, key, (1, int(h), int(w), 3))
  if pretrained_path is None:
    return variables
  path = None if pretrained_path == 'default' else pretrained_path
  pre = pretrained.backbone_variables(model.backbone, path, depthwise=model.depthwise)
  params = {**variables['params'], 'backbone': pre['params']}
  if cls_wnids:
    rows = pretrained.classifier_rows(list(cls_wnids), model.backbone, path)
    params['cls_head'] = {'logits': {k: jnp.asarray(v) for k, v in rows.items()}}
  return {**variables, 'params': params,
          'batch_stats': {**variables['batch_stats'], 'backbone': pre['batch_stats']}}


def count_params(variables) -> dict[str, int]:
  """Trainable parameter counts per top-level part (backbone, neck or *_neck, *_head) and in total."""
  params = variables.get('params', variables)
  counts = {name: sum(int(x.size) for x in jax.tree_util.tree_leaves(sub)) for name, sub in params.items()}
  counts['total'] = sum(counts.values())
  return counts
