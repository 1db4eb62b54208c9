"""ER-ACE: experience replay with an asymmetric cross-entropy (Caccia et al., ICLR 2022, "New Insights on
Reducing Abrupt Representation Change in Online Continual Learning").

When a new task's classes arrive, plain ER's cross-entropy on the incoming batch pushes down the logits of every
earlier class, the memory's included, and drags their representations along. ER-ACE keeps the two halves apart:
  incoming batch: cross-entropy over the classes present in the batch (and those never seen yet), i.e. the
                  logits of classes seen before but absent from the batch are masked out;
  memory batch:   cross-entropy over all classes, the gradient that keeps the earlier classes apart.
The classes "seen before" are those stored in the episodic memory, so no task boundary is needed: in the first
task the memory is empty and the incoming loss is plain cross-entropy. Class-incremental classification heads
(one label per example) of the classic protocols.
"""
import jax
import jax.numpy as jnp
import ml_collections

from clflax.strategies import base
from clflax.strategies import memory

MASKED = -1e9  # A masked logit: exp() underflows to exactly 0 in float32, the gradient to it too.


def seen_classes(buffer: memory.Buffer, num_classes: int) -> jax.Array:
  """[num_classes] bool: the classes with at least one example stored in `buffer`."""
  labels = jnp.where(memory.valid_slots(buffer), buffer.data['label'], num_classes)
  return jnp.zeros((num_classes + 1,), bool).at[labels].set(True)[:num_classes]


def incoming_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array, seen: jax.Array) -> jax.Array:
  """Mean over the valid rows of the cross-entropy of `logits` [B, C] with the classes seen before (`seen` [C])
  but absent from this batch masked out."""
  present = jnp.zeros(logits.shape[-1], bool).at[jnp.where(valid, labels, logits.shape[-1])].set(True, mode='drop')
  keep = present | ~seen
  log_p = jax.nn.log_softmax(jnp.where(keep, logits.astype(jnp.float32), MASKED), axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  weights = valid.astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory_per_task = 64  # Examples kept of each finished task.
  c.batch = 8  # Memory examples per step.
  c.weight = 1.0  # Weight of the memory batch's loss.
  return c


def _validate(cfg, names, config=None):
  del names
  base.check_fields('erace', cfg, {'memory_per_task': {'positive': True, 'integer': True},
                                   'batch': {'positive': True, 'integer': True}, 'weight': {}})
  if config is not None:
    base.require_classic('erace', config, 'its asymmetric cross-entropy is over the class logits of one head')


def _task_loss(cfg, ctx, params, key):
  del cfg, params, key
  stored = ctx.memories[memory.SHARED]
  seen = seen_classes(stored, ctx.outputs.shape[-1])
  return incoming_loss(ctx.outputs, ctx.batch['label'], ctx.batch['valid'], seen)


def _loss_terms(cfg, ctx, params, key):
  return {'erace_memory': cfg.weight * memory.memory_loss(ctx, params, key, cfg.batch)}


STRATEGY = base.Strategy(
    name='erace', config=default_config, validate=_validate,
    needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task), task_loss=_task_loss, loss_terms=_loss_terms)
