"""Learning without Forgetting (Li & Hoiem 2016): knowledge distillation.

The old heads' outputs on the new task's images, recorded by the frozen
previous model (the teacher), are targets for the current model. Both losses
use the KL form: equal to Hinton's soft-target cross-entropy minus the
teacher's entropy (same gradient), so the loss is exactly 0 when the logits
match the teacher. Scaled by T^2 to keep gradient size independent of T.
In the trainer the teacher is the model after the previous stage, and every
earlier head is distilled on the incoming batch (each task kind says how:
`clflax.tasks`).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from clflax.strategies import base


def _masked_mean(per_example: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  if mask is None:
    return jnp.mean(per_example)
  if mask.shape != per_example.shape:
    raise ValueError(f'mask shape {mask.shape} must equal the logits shape '
                     f'without the class axis, {per_example.shape}')
  mask = mask.astype(per_example.dtype)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check(logits, teacher_logits, temperature):
  if logits.shape != teacher_logits.shape:
    raise ValueError(f'logits {logits.shape} and teacher_logits '
                     f'{teacher_logits.shape} must have the same shape')
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float = 2.0,
                      mask: Optional[jax.Array] = None) -> jax.Array:
  """T^2 * KL(softmax(teacher/T) || softmax(logits/T)), mean over examples.

  Args:
    logits: [..., C] student logits (any leading shape, e.g. [B, H, W, C]).
    teacher_logits: same shape; treated as constants (no gradient).
    temperature: softening temperature T > 0.
    mask: optional [...] weights (e.g. 0 for ignored pixels); the mean is over
      the positions it selects (0 when it selects none).
  """
  _check(logits, teacher_logits, temperature)
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * _masked_mean(kl, mask)


def binary_distillation_loss(logits: jax.Array, teacher_logits: jax.Array,
                             temperature: float = 2.0,
                             mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-label (sigmoid) variant: per-class Bernoulli KL, summed over C.

  For heads trained with independent sigmoids (the detection heatmap): each
  of the C outputs is its own two-class distribution sigmoid(z / T).
  Same arguments and reduction as `distillation_loss`.
  """
  _check(logits, teacher_logits, temperature)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = logits.astype(jnp.float32) / temperature
  p = jax.nn.sigmoid(t)
  # log(1 - sigmoid(z)) = log_sigmoid(-z): stable for large |z|.
  kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
        + (1 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
  return temperature ** 2 * _masked_mean(jnp.sum(kl, axis=-1), mask)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.temperature = 2.0  # Distillation temperature T (loss scaled by T^2).
  c.weight = 1.0  # Weight of the distillation loss of the old heads.
  return c


def _loss_terms(cfg, ctx, params, key):
  """The mean over earlier heads of their distillation loss on the incoming batch."""
  if not ctx.earlier:
    return {}
  total = 0.0
  for head in ctx.earlier:
    student = ctx.apply(params, ctx.batch, head, key)
    teacher = ctx.apply_frozen(ctx.teacher, ctx.batch, head)
    total += ctx.distill(head, student, teacher, cfg.temperature)
  return {'lwf': cfg.weight * total / len(ctx.earlier)}


STRATEGY = base.Strategy(
    name='lwf', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'lwf', cfg, {'temperature': {'positive': True}, 'weight': {}}),
    needs=lambda cfg: base.Needs(teacher=True), loss_terms=_loss_terms)
