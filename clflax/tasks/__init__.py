"""What each head means: its loss, its distillation target (LwF), and how its validation scores are computed.

The trainer is task-agnostic; everything that differs between segmentation, detection and classification is here.
Device side (`loss`, `distill`, `eval_outputs`) is jittable; host side (`new_accumulator`, `accumulate`, `scores`)
turns the eval outputs of many batches into metrics (percentages).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clflax import losses
from clflax import metrics
from clflax.models import heads
from clflax.strategies import lwf

NUM_SEG_CLASSES = 21
IGNORE_LABEL = 255
TITLES = {'seg': 'VOC segmentation', 'det': 'COCO detection', 'cls': 'Imagenette classification'}
# Early stopping / criterion metric. Detection: the seed's image-level mAP (its "mAP 78.94"); COCO mAP@[.5:.95] is
# reported beside it, but an undertrained CenterNet holds it at exactly 0 for many epochs, and a metric stuck at 0
# made early stopping keep the first epoch's weights.
HEADLINE = {'seg': 'miou', 'det': 'image_map', 'cls': 'top1', 'digits': 'acc'}
METRICS = {'seg': ('miou', 'pixel_acc'), 'det': ('map', 'ap50', 'image_map'), 'cls': ('top1', 'top5'),
           'digits': ('acc',)}


def kind(task: str) -> str:
  """The vision heads are tasks of their own kind; any other task name is a classic-benchmark digit task."""
  return task if task in TITLES else 'digits'


def headline(task: str) -> str:
  return HEADLINE[kind(task)]


def title(task: str) -> str:
  return TITLES.get(task, task)


def loss(task: str, outputs, batch: dict, train_cfg: ml_collections.ConfigDict):
  """(scalar loss, dict of named parts) of `task`'s head on `batch`; padding rows (valid=False) do not count."""
  weights = batch['valid'].astype(jnp.float32)
  task = kind(task)
  if task == 'digits':
    total = losses.classification_loss(outputs, batch['label'], 0.0, weights=weights)
    return total, {'ce': total}
  if task == 'seg':
    total = losses.segmentation_loss(
        outputs, batch['mask'], NUM_SEG_CLASSES, IGNORE_LABEL, dice_weight=train_cfg.dice_weight, weights=weights)
    return total, {'seg': total}
  if task == 'det':
    image_size = batch['image'].shape[1:3]
    targets = heads.encode_targets(batch['boxes'], batch['classes'], batch['box_valid'], image_size)
    total, parts = losses.centernet_loss(
        outputs, targets, size_weight=train_cfg.size_weight, offset_weight=train_cfg.offset_weight, weights=weights)
    if 'image' in outputs:  # The image-level multi-label branch (model.det_image_head).
      parts['image'] = losses.image_label_loss(outputs['image'], batch['classes'], batch['box_valid'], weights)
      total = total + train_cfg.image_label_weight * parts['image']
    return total, {f'det_{k}': v for k, v in parts.items()}
  if task == 'cls':
    total = losses.classification_loss(outputs, batch['label'], train_cfg.label_smoothing, weights=weights)
    return total, {'cls': total}
  raise ValueError(f'unknown task {task!r}')


def distill(task: str, outputs, teacher_outputs, temperature: float):
  """LwF: keep `task`'s head answering like the previous model did, on the current images."""
  teacher_outputs = jax.lax.stop_gradient(teacher_outputs)
  if kind(task) == 'det':  # Per-cell, per-class sigmoid scores, plus the box geometry where objects were seen.
    heat = lwf.binary_distillation_loss(outputs['heatmap'], teacher_outputs['heatmap'], temperature)
    geometry = jnp.mean(jnp.abs(outputs['size'] - teacher_outputs['size']) * jax.nn.sigmoid(
        jnp.max(teacher_outputs['heatmap'], axis=-1, keepdims=True)))
    if 'image' in outputs:
      heat = heat + lwf.binary_distillation_loss(outputs['image'], teacher_outputs['image'], temperature)
    return heat + 0.1 * geometry
  return lwf.distillation_loss(outputs, teacher_outputs, temperature)


def eval_outputs(task: str, outputs, batch: dict, max_detections: int) -> dict:
  """Small per-batch summaries to bring to the host (e.g. a confusion matrix, not the full masks)."""
  valid = batch['valid']
  task = kind(task)
  if task == 'digits':
    return {'correct': jnp.sum((jnp.argmax(outputs, -1) == batch['label']) & valid), 'count': jnp.sum(valid)}
  if task == 'seg':
    pred = jnp.argmax(outputs, axis=-1)
    label = batch['mask']
    keep = (label != IGNORE_LABEL) & valid[:, None, None]
    codes = jnp.where(keep, label * NUM_SEG_CLASSES + pred, NUM_SEG_CLASSES * NUM_SEG_CLASSES)
    counts = jnp.bincount(codes.ravel(), length=NUM_SEG_CLASSES * NUM_SEG_CLASSES + 1)[:-1]
    return {'confusion': counts.reshape(NUM_SEG_CLASSES, NUM_SEG_CLASSES)}
  if task == 'det':
    decoded = heads.decode_detections(outputs, max_detections=max_detections)
    return dict(decoded, image_scores=heads.image_level_scores(outputs))
  if task == 'cls':
    return {'logits': outputs}
  raise ValueError(f'unknown task {task!r}')


def new_accumulator(task: str) -> dict:
  task = kind(task)
  if task == 'digits':
    return {'correct': 0, 'count': 0}
  if task == 'seg':
    return {'confusion': np.zeros((NUM_SEG_CLASSES, NUM_SEG_CLASSES), np.int64)}
  return {'outputs': [], 'batches': []}


def accumulate(task: str, acc: dict, outputs: dict, batch: dict) -> dict:
  """Adds one batch's eval outputs (already on the host) to `acc`, dropping padding rows."""
  task = kind(task)
  if task == 'digits':
    return {k: acc[k] + int(outputs[k]) for k in acc}
  if task == 'seg':
    acc['confusion'] += np.asarray(outputs['confusion'], np.int64)
    return acc
  valid = np.asarray(batch['valid'])
  acc['outputs'].append({k: np.asarray(v)[valid] for k, v in outputs.items()})
  keys = ('boxes', 'classes', 'box_valid') if task == 'det' else ('label',)
  acc['batches'].append({k: np.asarray(batch[k])[valid] for k in keys})
  return acc


def _concat(parts: list[dict]) -> dict:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def scores(task: str, acc: dict) -> dict:
  """Metrics of `task` in percent (NaN where undefined, e.g. no ground-truth boxes at all)."""
  task = kind(task)
  if task == 'digits':
    return {'acc': 100 * acc['correct'] / max(acc['count'], 1)}
  if task == 'seg':
    mean_iou, _ = metrics.miou(acc['confusion'])
    return {'miou': 100 * float(mean_iou), 'pixel_acc': 100 * float(metrics.pixel_accuracy(acc['confusion']))}
  if not acc['outputs']:
    return {name: float('nan') for name in METRICS[task]}
  out, gt = _concat(acc['outputs']), _concat(acc['batches'])
  if task == 'cls':
    return {'top1': 100 * float(metrics.topk_accuracy(out['logits'], gt['label'], 1)),
            'top5': 100 * float(metrics.topk_accuracy(out['logits'], gt['label'], 5))}
  detections = metrics.coco_map(
      metrics.unbatch({k: out[k] for k in ('boxes', 'scores', 'classes')}),
      metrics.unbatch({k: gt[k] for k in ('boxes', 'classes', 'box_valid')}))
  present = metrics.present_classes(gt['classes'], gt['box_valid'])
  return {'map': 100 * float(detections['map']), 'ap50': 100 * float(detections['ap50']),
          'image_map': 100 * float(metrics.image_level_map(out['image_scores'], present))}
