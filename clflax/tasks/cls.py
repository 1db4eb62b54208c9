"""Image classification (Imagenette): label-smoothed cross-entropy; top-1 and top-5 accuracy."""
import jax.numpy as jnp

from clflax import losses
from clflax import metrics
from clflax.strategies import lwf
from clflax.tasks import _rows

TITLE = 'Imagenette classification'
HEADLINE = 'top1'
METRICS = ('top1', 'top5')


def loss(outputs, batch, train_cfg):
  weights = batch['valid'].astype(jnp.float32)
  total = losses.classification_loss(outputs, batch['label'], train_cfg.label_smoothing, weights=weights)
  return total, {'cls': total}


def distill(outputs, teacher_outputs, temperature):
  return lwf.distillation_loss(outputs, teacher_outputs, temperature)


def eval_outputs(outputs, batch, max_detections):
  del batch, max_detections
  return {'logits': outputs}


new_accumulator = _rows.new_accumulator


def accumulate(acc, outputs, batch):
  return _rows.accumulate(acc, outputs, batch, ('label',))


def scores(acc):
  if not acc['outputs']:
    return {name: float('nan') for name in METRICS}
  out, gt = _rows.concat(acc['outputs']), _rows.concat(acc['batches'])
  return {'top1': 100 * float(metrics.topk_accuracy(out['logits'], gt['label'], 1)),
          'top5': 100 * float(metrics.topk_accuracy(out['logits'], gt['label'], 5))}
