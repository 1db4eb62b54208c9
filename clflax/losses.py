"""Per-task losses: pure jnp functions, jittable, each with an optional per-example weight.

`weights` is a per-example array `[B]` (float or bool; the batch's `valid` mask is the usual choice) or an array
shaped like the loss positions (`labels.shape`). Padding rows with weight 0 contribute nothing, to the numerator
or to the normaliser, so a padded last batch gives the same loss as the unpadded one. Every normaliser is clamped
away from zero: an all-padding (or all-ignored) batch gives a loss of 0, not NaN.
"""
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _broadcast_weights(weights: Optional[Array], shape: Tuple[int, ...]) -> Array:
  """Per-example weights [B] (or already `shape`) -> float32 array of `shape`."""
  if weights is None:
    return jnp.ones(shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.ndim == 1 and len(shape) > 1:
    if weights.shape[0] != shape[0]:
      raise ValueError(f"weights has {weights.shape[0]} rows but the batch has {shape[0]}")
    weights = weights.reshape(weights.shape + (1,) * (len(shape) - 1))
  try:
    return jnp.broadcast_to(weights, shape)
  except ValueError:
    raise ValueError(f"weights of shape {weights.shape} do not broadcast to {shape}") from None


def _safe_mean(values: Array, weights: Array) -> Array:
  """sum(w * v) / sum(w), 0 when every weight is 0."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def _check_labels(logits: Array, labels: Array) -> None:
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree: "
                     "expected logits = labels.shape + (num_classes,)")


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0,
                  ignore_index: Optional[int] = None, weights: Optional[Array] = None) -> Array:
  """Softmax cross-entropy averaged over valid, non-ignored positions.

  Works for `[B, C]` (classification) and `[B, H, W, C]` (per-pixel) logits with integer labels of the leading
  shape. Label smoothing follows optax: target = (1 - s) * one_hot + s / C. The mean is over positions (pixels
  of all images together), not a mean of per-image means.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_labels(logits, labels)
  num_classes = logits.shape[-1]
  mask = _broadcast_weights(weights, labels.shape)
  if ignore_index is not None:
    keep = labels != ignore_index
    mask = mask * keep
    labels = jnp.where(keep, labels, 0)  # any in-range class: the position is masked out anyway
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.sum(log_p, axis=-1) / num_classes
  return _safe_mean(nll, mask)


def dice_loss(logits: Array, labels: Array, num_classes: int, ignore_index: Optional[int] = 255,
              weights: Optional[Array] = None) -> Array:
  """Soft multi-class dice loss: 1 - mean over present classes of 2|P.Y| / (|P| + |Y|).

  P are the softmax probabilities, Y the one-hot labels; sums run over every valid pixel of the whole batch (one
  dice per class per batch, the stabler choice for small batches). A class is present when it occurs in the valid
  labels; absent classes are left out (their dice would only push their probabilities to 0, which CE already
  does). No class present -> 0.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_labels(logits, labels)
  if logits.shape[-1] != num_classes:
    raise ValueError(f"logits have {logits.shape[-1]} classes, num_classes={num_classes}")
  mask = _broadcast_weights(weights, labels.shape)
  if ignore_index is not None:
    mask = mask * (labels != ignore_index)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * mask[..., None]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[..., None]  # ignore -> zeros
  axes = tuple(range(labels.ndim))
  intersection = jnp.sum(probs * onehot, axis=axes)
  label_mass = jnp.sum(onehot, axis=axes)
  denom = jnp.sum(probs, axis=axes) + label_mass
  present = label_mass > 0
  dice = 2.0 * intersection / jnp.maximum(denom, 1e-12)
  num_present = jnp.sum(present)
  mean_dice = jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(num_present, 1)
  return jnp.where(num_present > 0, 1.0 - mean_dice, 0.0)


def segmentation_loss(logits: Array, labels: Array, num_classes: int = 21, ignore_index: int = 255,
                      dice_weight: float = 1.0, label_smoothing: float = 0.0,
                      weights: Optional[Array] = None) -> Array:
  """Per-pixel cross-entropy + `dice_weight` * soft dice (dice helps the rare, small VOC objects)."""
  ce = cross_entropy(logits, labels, label_smoothing, ignore_index, weights)
  if not dice_weight:
    return ce
  return ce + dice_weight * dice_loss(logits, labels, num_classes, ignore_index, weights)


def classification_loss(logits: Array, labels: Array, label_smoothing: float = 0.0,
                        weights: Optional[Array] = None) -> Array:
  """Cross-entropy over `[B, C]` logits, mean over examples with nonzero weight."""
  if jnp.ndim(logits) != 2:
    raise ValueError(f"classification logits must be [B, C], got shape {jnp.shape(logits)}")
  return cross_entropy(logits, labels, label_smoothing, None, weights)


def _power(x: Array, exponent: float) -> Array:
  """x ** exponent, as multiplications when the exponent is a whole number (CenterNet's 2 and 4): a float
  power is a log and an exp per element, and its gradient another log."""
  if float(exponent).is_integer():
    return jax.lax.integer_pow(x, int(exponent))
  return x ** exponent


def focal_heatmap_loss(logits: Array, target_heatmap: Array, alpha: float = 2.0, beta: float = 4.0,
                       weights: Optional[Array] = None) -> Array:
  """CenterNet's penalty-reduced pixel-wise focal loss, from logits.

  With p = sigmoid(logits) and gaussian targets Y (exact 1 at object centres):
    Y = 1:  -(1 - p)^alpha log(p);   else:  -(1 - Y)^beta p^alpha log(1 - p),
  summed and divided by the number of centres (at least 1). log p and log(1 - p) come from log_sigmoid(+-x),
  so saturated logits give finite losses and gradients.
  """
  logits = jnp.asarray(logits, jnp.float32)
  target = jnp.asarray(target_heatmap, jnp.float32)
  if logits.shape != target.shape:
    raise ValueError(f"heatmap logits {logits.shape} and targets {target.shape} differ in shape")
  w = _broadcast_weights(weights, logits.shape)
  log_p = jax.nn.log_sigmoid(logits)
  log_1mp = jax.nn.log_sigmoid(-logits)
  p, one_minus_p = jnp.exp(log_p), jnp.exp(log_1mp)
  positive = target >= 1.0
  pos_loss = -_power(one_minus_p, alpha) * log_p
  neg_loss = -_power(1.0 - target, beta) * _power(p, alpha) * log_1mp
  loss = jnp.where(positive, pos_loss, neg_loss)
  num_pos = jnp.sum(positive * w)
  return jnp.sum(loss * w) / jnp.maximum(num_pos, 1.0)


def _gather_cells(dense: Array, index: Array) -> Array:
  """[B, h, w, D] map, [B, M] flat cell indices y * w + x -> [B, M, D]."""
  b, h, w, d = dense.shape
  flat = dense.reshape(b, h * w, d)
  index = jnp.clip(index.astype(jnp.int32), 0, h * w - 1)  # padded boxes may hold junk indices
  return jnp.take_along_axis(flat, index[..., None], axis=1)


def centernet_loss(det_out: Mapping[str, Array], targets: Mapping[str, Array], size_weight: float = 0.1,
                   offset_weight: float = 1.0,
                   weights: Optional[Array] = None) -> Tuple[Array, dict]:
  """Focal heatmap loss + L1 on box size and centre offset at the object centres.

  `det_out`: `heatmap` [B, h, w, C] logits, `size` / `offset` [B, h, w, 2]. `targets` (from
  `clflax.models.heads.encode_targets`): `heatmap` [B, h, w, C], `size` / `offset` [B, M, 2], `index` [B, M],
  `valid` [B, M]. The L1 terms are means over both coordinates of the valid boxes of the weighted examples.
  Returns (total, {"heatmap", "size", "offset"}).
  """
  for key in ("heatmap", "size", "offset"):
    if key not in det_out:
      raise ValueError(f"det_out lacks '{key}' (has {sorted(det_out)})")
  for key in ("heatmap", "size", "offset", "index", "valid"):
    if key not in targets:
      raise ValueError(f"targets lack '{key}' (has {sorted(targets)})")
  heat = focal_heatmap_loss(det_out["heatmap"], targets["heatmap"], weights=weights)
  box_mask = jnp.asarray(targets["valid"], jnp.float32)
  box_mask = box_mask * _broadcast_weights(weights, box_mask.shape)
  coord_mask = jnp.broadcast_to(box_mask[..., None], box_mask.shape + (2,))

  def l1(name):
    pred = _gather_cells(jnp.asarray(det_out[name], jnp.float32), jnp.asarray(targets["index"]))
    return _safe_mean(jnp.abs(pred - jnp.asarray(targets[name], jnp.float32)), coord_mask)

  size, offset = l1("size"), l1("offset")
  total = heat + size_weight * size + offset_weight * offset
  return total, {"heatmap": heat, "size": size, "offset": offset}


def present_classes(classes: Array, box_valid: Array, num_classes: int) -> Array:
  """[B, M] box classes + [B, M] validity -> [B, num_classes] float multi-hot of the classes each image holds."""
  onehot = jax.nn.one_hot(jnp.asarray(classes, jnp.int32), num_classes, dtype=jnp.float32)
  return jnp.max(onehot * jnp.asarray(box_valid, jnp.float32)[..., None], axis=1)


def image_label_loss(logits: Array, classes: Array, box_valid: Array, weights: Optional[Array] = None) -> Array:
  """Multi-label sigmoid cross-entropy of image-level class logits [B, C] against the classes of each image's
  valid boxes: mean over classes, then over examples with nonzero weight."""
  logits = jnp.asarray(logits, jnp.float32)
  target = present_classes(classes, box_valid, logits.shape[-1])
  per_class = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))  # stable BCE
  return _safe_mean(jnp.mean(per_class, axis=-1), _broadcast_weights(weights, logits.shape[:1]))
