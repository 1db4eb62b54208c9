"""Semantic segmentation (PASCAL VOC): per-pixel cross-entropy + dice; mIoU from a confusion matrix."""
import jax.numpy as jnp
import numpy as np

from clflax import losses
from clflax import metrics
from clflax.strategies import lwf

TITLE = 'VOC segmentation'
HEADLINE = 'miou'
METRICS = ('miou', 'pixel_acc')
NUM_CLASSES = 21
IGNORE_LABEL = 255


def loss(outputs, batch, train_cfg):
  weights = batch['valid'].astype(jnp.float32)
  total = losses.segmentation_loss(outputs, batch['mask'], NUM_CLASSES, IGNORE_LABEL,
                                   dice_weight=train_cfg.dice_weight, weights=weights)
  return total, {'seg': total}


def distill(outputs, teacher_outputs, temperature):
  return lwf.distillation_loss(outputs, teacher_outputs, temperature)


def eval_outputs(outputs, batch, max_detections):
  """The batch's confusion counts (label x prediction over the pixels that count), not the masks."""
  del max_detections
  pred = jnp.argmax(outputs, axis=-1)
  label = batch['mask']
  keep = (label != IGNORE_LABEL) & batch['valid'][:, None, None]
  codes = jnp.where(keep, label * NUM_CLASSES + pred, NUM_CLASSES * NUM_CLASSES)
  counts = jnp.bincount(codes.ravel(), length=NUM_CLASSES * NUM_CLASSES + 1)[:-1]
  return {'confusion': counts.reshape(NUM_CLASSES, NUM_CLASSES)}


def new_accumulator():
  return {'confusion': np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)}


def accumulate(acc, outputs, batch):
  del batch
  acc['confusion'] += np.asarray(outputs['confusion'], np.int64)
  return acc


def scores(acc):
  mean_iou, _ = metrics.miou(acc['confusion'])
  return {'miou': 100 * float(mean_iou), 'pixel_acc': 100 * float(metrics.pixel_accuracy(acc['confusion']))}
