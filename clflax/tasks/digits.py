"""The classic protocols' digit tasks (every task name other than seg / det / cls): cross-entropy; accuracy."""
import jax.numpy as jnp

from clflax import losses
from clflax.strategies import lwf

TITLE = None  # The task's own name.
HEADLINE = 'acc'
METRICS = ('acc',)


def loss(outputs, batch, train_cfg):
  del train_cfg
  total = losses.classification_loss(outputs, batch['label'], 0.0, weights=batch['valid'].astype(jnp.float32))
  return total, {'ce': total}


def distill(outputs, teacher_outputs, temperature):
  return lwf.distillation_loss(outputs, teacher_outputs, temperature)


def eval_outputs(outputs, batch, max_detections):
  del max_detections
  valid = batch['valid']
  return {'correct': jnp.sum((jnp.argmax(outputs, -1) == batch['label']) & valid), 'count': jnp.sum(valid)}


def new_accumulator():
  return {'correct': 0, 'count': 0}


def accumulate(acc, outputs, batch):
  del batch
  return {k: acc[k] + int(outputs[k]) for k in acc}


def scores(acc):
  return {'acc': 100 * acc['correct'] / max(acc['count'], 1)}
