"""Losses against NumPy references written from the formulas, and closed forms on tiny cases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax import losses


def _jit(fn, **static):
  """One compile per call site: much faster than eager op-by-op dispatch on the shared 2-core CPU."""
  return jax.jit(functools.partial(fn, **static))


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_cross_entropy(logits, labels, smoothing, ignore, weights):
  """Loop over positions: one term per (kept) position, weighted mean."""
  c = logits.shape[-1]
  flat_logits = logits.reshape(-1, c).astype(np.float64)
  flat_labels = labels.reshape(-1)
  flat_w = np.broadcast_to(weights.reshape(weights.shape + (1,) * (labels.ndim - 1)), labels.shape).reshape(-1)
  num = den = 0.0
  for z, y, w in zip(flat_logits, flat_labels, flat_w):
    if ignore is not None and y == ignore:
      continue
    target = np.full(c, smoothing / c)
    target[y] += 1.0 - smoothing
    num += w * -(target * _np_log_softmax(z)).sum()
    den += w
  return num / den


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_segmentation_matches_numpy(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(3, 4, 5))
  labels[rng.random(labels.shape) < 0.3] = 255
  valid = np.array([1.0, 0.0, 1.0])  # the middle image is padding
  got = _jit(losses.cross_entropy, label_smoothing=smoothing, ignore_index=255)(logits, labels, weights=valid)
  want = _np_cross_entropy(logits, labels, smoothing, 255, valid)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_classification_weights_and_jit():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(7, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=7)
  weights = rng.random(7)
  fn = jax.jit(lambda z, y, w: losses.classification_loss(z, y, 0.2, weights=w))
  np.testing.assert_allclose(fn(logits, labels, weights),
                             _np_cross_entropy(logits, labels, 0.2, None, weights), rtol=1e-5)
  # Unweighted: plain mean of -log softmax at the label.
  want = -np.mean(_np_log_softmax(logits.astype(np.float64))[np.arange(7), labels])
  np.testing.assert_allclose(_jit(losses.cross_entropy)(logits, labels), want, rtol=1e-5)


def test_cross_entropy_empty_mask_is_zero_not_nan():
  logits = jnp.zeros((2, 2, 2, 3))
  labels = jnp.full((2, 2, 2), 255)
  assert float(_jit(losses.cross_entropy, ignore_index=255)(logits, labels)) == 0.0
  assert float(_jit(losses.cross_entropy)(jnp.zeros((2, 3)), jnp.array([0, 1]), weights=jnp.zeros(2))) == 0.0


def test_cross_entropy_rejects_bad_shapes():
  with pytest.raises(ValueError, match="logits"):
    losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="weights"):
    losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), weights=jnp.ones(5))


def test_dice_closed_form_hard_predictions():
  # Near-one-hot logits: probabilities are 0/1 up to e^-50, so dice is a count ratio.
  # labels: [0, 0, 1, 255]; predictions: [0, 1, 1, 0] (the last pixel is ignored).
  labels = np.array([[[0, 0, 1, 255]]])
  pred = np.array([[[0, 1, 1, 0]]])
  logits = 100.0 * (jax.nn.one_hot(pred, 3) - 0.5)
  # class 0: |P∩Y| = 1, |P| = 1, |Y| = 2 -> 2/3 ; class 1: 1, 2, 1 -> 2/3 ; class 2 absent -> excluded.
  got = _jit(losses.dice_loss, num_classes=3)(logits, labels)
  np.testing.assert_allclose(got, 1.0 - 2.0 / 3.0, rtol=1e-5)


def test_dice_closed_form_uniform_probabilities():
  # Uniform logits: p = 1/C everywhere. For a present class with n_c of N pixels:
  # dice_c = 2 (n_c / C) / (N / C + n_c).
  labels = np.array([[0, 0, 0, 1], [1, 255, 255, 255]])
  c = 4
  logits = np.zeros(labels.shape + (c,), np.float32)
  n = 5
  dices = [2 * (k / c) / (n / c + k) for k in (3, 2)]
  dice = _jit(losses.dice_loss, num_classes=c)
  np.testing.assert_allclose(dice(logits, labels), 1 - np.mean(dices), rtol=1e-5)
  # Weight 0 on the second row removes its pixels entirely: class 1 has one pixel out of four.
  dices = [2 * (k / c) / (4 / c + k) for k in (3, 1)]
  np.testing.assert_allclose(dice(logits, labels, weights=np.array([1.0, 0.0])),
                             1 - np.mean(dices), rtol=1e-5)


def test_dice_no_present_class_and_segmentation_loss_sum():
  labels = jnp.full((1, 2, 2), 255)
  assert float(_jit(losses.dice_loss, num_classes=3)(jnp.zeros((1, 2, 2, 3)), labels)) == 0.0
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(2, 3, 3))
  total = _jit(losses.segmentation_loss, num_classes=4, dice_weight=0.5)(logits, labels)
  want = _np_cross_entropy(logits, labels, 0.0, None, np.ones(2))
  np.testing.assert_allclose(total - 0.5 * _jit(losses.dice_loss, num_classes=4)(logits, labels), want, rtol=1e-5)


def _np_focal(logits, target, alpha, beta, weights):
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  pos = target == 1
  w = np.broadcast_to(weights.reshape(-1, 1, 1, 1), x.shape)
  term = np.where(pos, -((1 - p) ** alpha) * np.log(p), -((1 - target) ** beta) * p ** alpha * np.log(1 - p))
  return (term * w).sum() / max((pos * w).sum(), 1)


def test_focal_heatmap_loss_matches_numpy_formula():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32) * 2
  target = rng.random((2, 4, 5, 3)).astype(np.float32) * 0.9
  target[0, 1, 2, 0] = target[1, 3, 4, 2] = target[1, 0, 0, 1] = 1.0
  weights = np.array([1.0, 1.0])
  np.testing.assert_allclose(_jit(losses.focal_heatmap_loss)(logits, target),
                             _np_focal(logits, target, 2, 4, weights), rtol=1e-5)
  weights = np.array([0.0, 1.0])
  np.testing.assert_allclose(_jit(losses.focal_heatmap_loss, alpha=1.5, beta=3)(logits, target, weights=weights),
                             _np_focal(logits, target, 1.5, 3, weights), rtol=1e-5)


def test_focal_heatmap_loss_is_stable_for_saturated_logits():
  logits = jnp.array([[[[-200.0, 200.0]]]])
  target = jnp.array([[[[1.0, 0.0]]]])  # confidently wrong on both: a finite, large loss
  value, grad = jax.jit(jax.value_and_grad(losses.focal_heatmap_loss))(logits, target)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, 400.0, rtol=1e-5)  # 200 (positive) + 200 (negative), one centre
  # Confidently right: loss ~ 0; no centres at all: normalised by 1.
  focal = _jit(losses.focal_heatmap_loss)
  assert float(focal(-logits, target)) < 1e-30
  np.testing.assert_allclose(focal(jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1))),
                             0.25 * np.log(2), rtol=1e-6)


def test_centernet_loss_gathers_at_index_and_masks_boxes():
  rng = np.random.default_rng(4)
  b, h, w, c, m = 2, 3, 4, 2, 3
  det_out = {"heatmap": rng.normal(size=(b, h, w, c)).astype(np.float32),
             "size": rng.normal(size=(b, h, w, 2)).astype(np.float32),
             "offset": rng.normal(size=(b, h, w, 2)).astype(np.float32)}
  heat = np.zeros((b, h, w, c), np.float32)
  heat[0, 1, 2, 0] = heat[1, 2, 3, 1] = 1.0
  targets = {"heatmap": heat, "size": rng.normal(size=(b, m, 2)).astype(np.float32),
             "offset": rng.random((b, m, 2)).astype(np.float32),
             "index": np.array([[1 * w + 2, 0, 999], [2 * w + 3, 5, 0]], np.int32),
             "valid": np.array([[True, False, False], [True, True, False]])}
  total, parts = jax.jit(losses.centernet_loss)(det_out, targets)
  # Brute force over the valid boxes with explicit (y, x) cells.
  cells = {(0, 0): (1, 2), (1, 0): (2, 3), (1, 1): (1, 1)}
  for name in ("size", "offset"):
    errs = [np.abs(det_out[name][i, y, x] - targets[name][i, j]) for (i, j), (y, x) in cells.items()]
    np.testing.assert_allclose(parts[name], np.mean(errs), rtol=1e-5)
  np.testing.assert_allclose(parts["heatmap"], _np_focal(det_out["heatmap"], heat, 2, 4, np.ones(b)), rtol=1e-5)
  np.testing.assert_allclose(total, parts["heatmap"] + 0.1 * parts["size"] + parts["offset"], rtol=1e-6)
  # Weight 0 on image 1 keeps only image 0's single box.
  _, parts = jax.jit(losses.centernet_loss)(det_out, targets, weights=np.array([1.0, 0.0]))
  np.testing.assert_allclose(parts["size"], np.abs(det_out["size"][0, 1, 2] - targets["size"][0, 0]).mean(),
                             rtol=1e-5)


def test_centernet_loss_names_missing_keys():
  with pytest.raises(ValueError, match="index"):
    losses.centernet_loss({"heatmap": 0, "size": 0, "offset": 0}, {"heatmap": 0, "size": 0, "offset": 0,
                                                                    "valid": 0})


def test_image_label_loss_against_a_per_class_loop():
  rng = np.random.default_rng(5)
  logits = (rng.normal(size=(3, 4)) * 30).astype(np.float32)  # Saturated logits too.
  classes = np.array([[1, 1, 3], [0, 2, 2], [3, 0, 0]], np.int32)
  box_valid = np.array([[True, True, False], [True, False, True], [False, False, False]])
  weights = np.array([1.0, 1.0, 0.0])
  expected = []
  for i in range(2):  # Image 2 weighs nothing.
    present = {int(c) for c, v in zip(classes[i], box_valid[i]) if v}  # image 0: {1}; image 1: {0, 2}
    # -log sigmoid(z) = log(1 + e^-z) for a present class, -log(1 - sigmoid(z)) = log(1 + e^z) for an absent one.
    terms = [np.logaddexp(0.0, -z if c in present else z) for c, z in enumerate(logits[i].astype(np.float64))]
    expected.append(np.mean(terms))
  got = jax.jit(losses.image_label_loss)(logits, classes, box_valid, weights)
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  np.testing.assert_array_equal(losses.present_classes(classes, box_valid, 4),
                                [[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
