"""Object detection (COCO): CenterNet heatmap, size and offset losses plus the image-level multi-label branch;
COCO box mAP@[.5:.95] and AP50 (pycocotools) and the image-level mAP."""
import jax
import jax.numpy as jnp

from clflax import losses
from clflax import metrics
from clflax.models import heads
from clflax.strategies import lwf
from clflax.tasks import _rows

TITLE = 'COCO detection'
# Early stopping / criterion metric: the seed's image-level mAP (its "mAP 78.94"); COCO mAP@[.5:.95] is reported
# beside it, but an undertrained CenterNet holds it at exactly 0 for many epochs, and a metric stuck at 0 made early
# stopping keep the first epoch's weights.
HEADLINE = 'image_map'
METRICS = ('map', 'ap50', 'image_map')
KEYS = ('boxes', 'classes', 'box_valid')


def loss(outputs, batch, train_cfg):
  weights = batch['valid'].astype(jnp.float32)
  image_size = batch['image'].shape[1:3]
  targets = heads.encode_targets(batch['boxes'], batch['classes'], batch['box_valid'], image_size)
  total, parts = losses.centernet_loss(outputs, targets, size_weight=train_cfg.size_weight,
                                       offset_weight=train_cfg.offset_weight, weights=weights)
  if 'image' in outputs:  # The image-level multi-label branch (model.det_image_head).
    parts['image'] = losses.image_label_loss(outputs['image'], batch['classes'], batch['box_valid'], weights)
    total = total + train_cfg.image_label_weight * parts['image']
  return total, {f'det_{k}': v for k, v in parts.items()}


def distill(outputs, teacher_outputs, temperature):
  """Per-cell, per-class sigmoid scores, plus the box geometry where the teacher saw objects."""
  heat = lwf.binary_distillation_loss(outputs['heatmap'], teacher_outputs['heatmap'], temperature)
  geometry = jnp.mean(jnp.abs(outputs['size'] - teacher_outputs['size']) * jax.nn.sigmoid(
      jnp.max(teacher_outputs['heatmap'], axis=-1, keepdims=True)))
  if 'image' in outputs:
    heat = heat + lwf.binary_distillation_loss(outputs['image'], teacher_outputs['image'], temperature)
  return heat + 0.1 * geometry


def eval_outputs(outputs, batch, max_detections):
  del batch
  decoded = heads.decode_detections(outputs, max_detections=max_detections)
  return dict(decoded, image_scores=heads.image_level_scores(outputs))


new_accumulator = _rows.new_accumulator


def accumulate(acc, outputs, batch):
  return _rows.accumulate(acc, outputs, batch, KEYS)


def scores(acc):
  if not acc['outputs']:
    return {name: float('nan') for name in METRICS}
  out, gt = _rows.concat(acc['outputs']), _rows.concat(acc['batches'])
  detections = metrics.coco_map(metrics.unbatch({k: out[k] for k in ('boxes', 'scores', 'classes')}),
                                metrics.unbatch({k: gt[k] for k in KEYS}))
  present = metrics.present_classes(gt['classes'], gt['box_valid'])
  return {'map': 100 * float(detections['map']), 'ap50': 100 * float(detections['ap50']),
          'image_map': 100 * float(metrics.image_level_map(out['image_scores'], present))}
