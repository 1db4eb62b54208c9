"""Dark Experience Replay, DER and DER++ (Buzzega et al. 2020).

The replay buffer (`memory.ReplayBuffer`, reservoir sampling) also stores the
network's logits at the time each example was seen. Replaying them is a
distillation towards the whole past trajectory:
  DER:   loss = task loss + alpha * MSE(f(x_buf), z_buf)
  DER++: ... + beta * CE(f(x'_buf), y'_buf)
The paper draws the two replay terms from two independent buffer samples;
`logit_loss` and `label_loss` are the two terms for that, and `loss` is their
weighted sum on one sample (cheaper: one forward pass of the replayed batch).
"""
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from clflax.strategies import base
from clflax.strategies import memory

PyTree = Any

LOGITS = memory.OUTPUTS  # Key of the stored logits in buffer examples.


def with_logits(examples: Mapping[str, Any], logits: jax.Array,
                dtype: Optional[Any] = None) -> dict:
  """examples (a dict, one example or a batch) plus a 'logits' entry.

  `dtype` (e.g. jnp.bfloat16) stores the logits compactly; the losses compute
  in float32. Works for one example (to `init` a buffer) and for batches (to
  `memory.add`), and under jit.
  """
  if not isinstance(examples, Mapping):
    raise ValueError(f'examples must be a dict to hold a {LOGITS!r} entry, '
                     f'got {type(examples).__name__}')
  if LOGITS in examples:
    raise ValueError(f'examples already have a {LOGITS!r} entry')
  logits = jnp.asarray(logits)
  return {**examples, LOGITS: logits if dtype is None else logits.astype(dtype)}


def split_logits(examples: Mapping[str, Any]):
  """(examples without 'logits', logits): undoes `with_logits`."""
  if not isinstance(examples, Mapping) or LOGITS not in examples:
    raise ValueError(f'examples must be a dict with a {LOGITS!r} entry')
  rest = {k: v for k, v in examples.items() if k != LOGITS}
  return rest, examples[LOGITS]


def init_buffer(capacity: int, example: Mapping[str, Any], logits: Any,
                dtype: Optional[Any] = None) -> memory.ReplayBuffer:
  """Empty reservoir buffer for examples like `example` plus their logits.

  `logits` is one example's logits or a jax.ShapeDtypeStruct like them.
  """
  if isinstance(logits, jax.ShapeDtypeStruct):
    logits = jnp.zeros(logits.shape, logits.dtype)
  return memory.init(capacity, with_logits(example, logits, dtype))


def _weights(mask: Optional[jax.Array], shape) -> Optional[jax.Array]:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != shape:
    raise ValueError(f'mask shape {mask.shape} must equal the logits shape '
                     f'without the class axis, {shape}')
  return mask.astype(jnp.float32)


def logit_loss(logits: jax.Array, buffer_logits: jax.Array,
               mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean squared error between current and stored logits.

  Mean over all entries (examples, positions and classes), as the authors'
  `F.mse_loss`. `mask` [...] (logits shape without the class axis, e.g. 0
  for padded replay slots) restricts the mean to the positions it selects.
  """
  if logits.shape != buffer_logits.shape:
    raise ValueError(f'logits {logits.shape} and buffer_logits '
                     f'{buffer_logits.shape} must have the same shape')
  target = jax.lax.stop_gradient(buffer_logits).astype(jnp.float32)
  sq = jnp.square(logits.astype(jnp.float32) - target)
  w = _weights(mask, logits.shape[:-1])
  if w is None:
    return jnp.mean(sq)
  total = jnp.sum(sq * w[..., None])
  return total / jnp.maximum(jnp.sum(w) * logits.shape[-1], 1.0)


def label_loss(logits: jax.Array, labels: jax.Array,
               mask: Optional[jax.Array] = None) -> jax.Array:
  """Cross-entropy of integer labels, mean over the counted positions.

  Labels outside [0, C) (e.g. 255 = void in VOC masks) are not counted;
  neither are positions where `mask` is 0. 0 when nothing is counted.
  """
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f'labels shape {labels.shape} must equal the logits shape '
                     f'without the class axis, {logits.shape[:-1]}')
  num_classes = logits.shape[-1]
  ok = (labels >= 0) & (labels < num_classes)
  w = ok.astype(jnp.float32)
  mw = _weights(mask, labels.shape)
  if mw is not None:
    w = w * mw
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(ok, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def loss(logits: jax.Array, buffer_logits: jax.Array,
         buffer_labels: Optional[jax.Array] = None, alpha: float = 0.1,
         beta: float = 0.0, mask: Optional[jax.Array] = None) -> jax.Array:
  """alpha * MSE(logits, buffer_logits) + beta * CE(logits, buffer_labels).

  Args:
    logits: the current model's [..., C] logits on the replayed inputs.
    buffer_logits: the logits stored with them (same shape; no gradient).
    buffer_labels: [...] int labels stored with them; needed when beta != 0
      (DER++), ignored for beta = 0 (DER).
    alpha, beta: weights of the two terms (the paper's alpha and beta).
    mask: optional [...] weights, e.g. `memory.size(buffer) > 0` broadcast,
      so an empty buffer contributes nothing.
  """
  for name, v in (('alpha', alpha), ('beta', beta)):
    if isinstance(v, (int, float)) and not v >= 0:
      raise ValueError(f'der: {name} must be >= 0, got {v}')
  total = alpha * logit_loss(logits, buffer_logits, mask)
  if isinstance(beta, (int, float)) and beta == 0:
    return total
  if buffer_labels is None:
    raise ValueError('der: beta != 0 (DER++) needs buffer_labels')
  return total + beta * label_loss(logits, buffer_labels, mask)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory_per_task = 64  # Examples (with the model's logits at the end of their stage) kept per task.
  c.batch = 8  # Memory examples per step for each replay term (per old task with per-task memories).
  c.alpha = 0.3  # Weight of the MSE between current and stored logits (DER's distillation term).
  c.beta = 0.0  # Weight of the memory labels' task loss: 0 = DER, > 0 = DER++.
  return c


def replay_terms(cfg, ctx, params, stored, head, key) -> jax.Array:
  """alpha * MSE(outputs, stored outputs) + beta * task loss on memory examples of `head`, the two terms on two
  independent samples as in the paper (beta = 0, DER: one sample only). Multi-output heads (detection) average the
  MSE of their outputs."""

  def sample_outputs(sample_key):
    sample_key, drop_key = jax.random.split(sample_key)
    batch, logits = split_logits(memory.sample(stored, sample_key, cfg.batch))
    return batch, logits, ctx.apply(params, batch, head, drop_key)

  logit_key, label_key = jax.random.split(key)
  _, logits, outputs = sample_outputs(logit_key)
  mse = jax.tree.leaves(jax.tree.map(logit_loss, outputs, logits))
  total = cfg.alpha * sum(mse) / len(mse)
  if cfg.beta:
    batch, _, outputs = sample_outputs(label_key)
    total += cfg.beta * ctx.loss(head, outputs, batch)[0]
  return total


def _loss_terms(cfg, ctx, params, key):
  """DER / DER++ on the SHARED memory (zero while empty), or the loss-weighted mean over earlier tasks of their
  memories' terms, each through its own head."""
  if not memory.available(ctx):
    return {}
  if memory.SHARED in ctx.memories:
    stored = ctx.memories[memory.SHARED]
    value = jnp.where(memory.size(stored) > 0, replay_terms(cfg, ctx, params, stored, ctx.task, key), 0.0)
    return {'der': value}
  weights, total = ctx.config.train.loss_weights, 0.0
  for head, head_key in zip(ctx.earlier, jax.random.split(key, len(ctx.earlier))):
    total += weights[head] * replay_terms(cfg, ctx, params, ctx.memories[head], head, head_key)
  return {'der': total / len(ctx.earlier)}


STRATEGY = base.Strategy(
    name='der', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'der', cfg, {'memory_per_task': {'positive': True, 'integer': True},
                     'batch': {'positive': True, 'integer': True}, 'alpha': {}, 'beta': {}}),
    needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task, memory_outputs=True),
    loss_terms=_loss_terms)
