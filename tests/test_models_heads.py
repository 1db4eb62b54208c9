"""CenterNet targets and decoding against a loop-based NumPy reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import heads as H


def _radius_numpy(h, w, m=0.7):
  """CenterNet's gaussian_radius, scalar by scalar."""
  r1 = ((h + w) + math.sqrt((h + w) ** 2 - 4 * w * h * (1 - m) / (1 + m))) / 2
  r2 = (2 * (h + w) + math.sqrt(4 * (h + w) ** 2 - 16 * (1 - m) * w * h)) / 2
  r3 = (-2 * m * (h + w) + math.sqrt(4 * m * m * (h + w) ** 2 - 16 * m * (m - 1) * w * h)) / 2
  return min(r1, r2, r3)


def _encode_numpy(boxes, classes, valid, image_hw, num_classes, stride):
  """Draws each object's Gaussian pixel by pixel, as CenterNet's draw_umich_gaussian does."""
  b, m, _ = boxes.shape
  h, w = -(-image_hw[0] // stride), -(-image_hw[1] // stride)
  heat = np.zeros((b, h, w, num_classes))
  size, offset = np.zeros((b, m, 2)), np.zeros((b, m, 2))
  index, ok = np.zeros((b, m), np.int64), np.zeros((b, m), bool)
  for i in range(b):
    for j in range(m):
      y0, x0, y1, x1 = boxes[i, j] / stride
      if not valid[i, j] or y1 <= y0 or x1 <= x0:
        continue
      ok[i, j] = True
      cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
      iy, ix = min(int(cy), h - 1), min(int(cx), w - 1)
      size[i, j], offset[i, j], index[i, j] = (y1 - y0, x1 - x0), (cy - iy, cx - ix), iy * w + ix
      r = max(0, int(_radius_numpy(math.ceil(y1 - y0), math.ceil(x1 - x0))))
      sigma = (2 * r + 1) / 6
      for yy in range(max(0, iy - r), min(h, iy + r + 1)):
        for xx in range(max(0, ix - r), min(w, ix + r + 1)):
          g = math.exp(-((yy - iy) ** 2 + (xx - ix) ** 2) / (2 * sigma ** 2))
          heat[i, yy, xx, classes[i, j]] = max(heat[i, yy, xx, classes[i, j]], g)
  return heat, size, offset, index, ok


def test_gaussian_radius_hand_value():
  # 10 x 10 cells: the third case wins, (-28 + sqrt(1120)) / 2.
  np.testing.assert_allclose(float(H.gaussian_radius(10.0, 10.0)), (-28 + math.sqrt(1120)) / 2, rtol=1e-6)


def test_encode_matches_brute_force():
  rng = np.random.default_rng(0)
  b, m, image_hw, num_classes = 3, 7, (140, 170), 3  # Not multiples of 8: ceil'd map.
  y0 = rng.uniform(0, 120, (b, m))
  x0 = rng.uniform(0, 150, (b, m))
  boxes = np.stack([y0, x0, y0 + rng.uniform(2, 120, (b, m)), x0 + rng.uniform(2, 120, (b, m))], -1)
  boxes = np.minimum(boxes, [140, 170, 140, 170]).astype(np.float32)
  boxes[0, 0] = [10, 10, 10, 30]  # Empty box: must not count.
  classes = rng.integers(0, num_classes, (b, m)).astype(np.int32)
  valid = rng.uniform(size=(b, m)) < 0.8
  valid[0, 0] = True
  encode = jax.jit(H.encode_targets, static_argnums=(3, 4, 5))
  got = encode(boxes, classes, valid, image_hw, num_classes, 8)
  heat, size, offset, index, ok = _encode_numpy(boxes.astype(np.float64), classes, valid, image_hw, num_classes, 8)
  assert got['heatmap'].shape == (b, 18, 22, num_classes)
  np.testing.assert_array_equal(np.asarray(got['valid']), ok)
  assert not ok[0, 0]
  np.testing.assert_allclose(np.asarray(got['heatmap']), heat, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got['size']), size, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got['offset']), offset, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got['index'])[ok], index[ok])
  # Peak 1 at every valid centre cell of its class.
  flat = np.asarray(got['heatmap']).reshape(b, -1, num_classes)
  for i, j in zip(*np.nonzero(ok)):
    assert flat[i, index[i, j], classes[i, j]] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='boxes must be'):
    H.encode_targets(boxes[..., :3], classes, valid, image_hw)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(1)
  b, m, side, stride = 2, 5, 128, 8
  cells = side // stride
  boxes, classes = np.zeros((b, m, 4), np.float32), rng.integers(0, 80, (b, m)).astype(np.int32)
  for i in range(b):  # Centres on a coarse grid: distinct, never neighbouring cells.
    picks = rng.choice(np.arange(1, cells // 3) * 3, size=(m, 2), replace=True)
    while len({tuple(p) for p in picks}) < m:
      picks = rng.choice(np.arange(1, cells // 3) * 3, size=(m, 2), replace=True)
    centre = (picks + rng.uniform(0.05, 0.95, (m, 2))) * stride
    half = rng.uniform(4, 30, (m, 2))
    boxes[i] = np.concatenate([centre - half, centre + half], -1)
  valid = np.ones((b, m), bool)
  t = jax.jit(H.encode_targets, static_argnums=3)(boxes, classes, valid, side)
  # A perfect prediction: heatmap logits of the targets, size/offset written at the centre cells.
  heat = jnp.clip(t['heatmap'], 1e-6, 1 - 1e-6)
  size = np.zeros((b, cells * cells, 2), np.float32)
  offset = np.zeros((b, cells * cells, 2), np.float32)
  for i in range(b):
    size[i, np.asarray(t['index'][i])] = np.asarray(t['size'][i])
    offset[i, np.asarray(t['index'][i])] = np.asarray(t['offset'][i])
  det = {'heatmap': jnp.log(heat / (1 - heat)), 'size': size.reshape(b, cells, cells, 2),
         'offset': offset.reshape(b, cells, cells, 2)}
  out = jax.jit(H.decode_detections, static_argnums=1)(det, 20)
  assert out['boxes'].shape == (b, 20, 4) and out['classes'].dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(out['scores'][:, :m]), 1.0, atol=1e-5)
  assert np.all(np.asarray(out['scores'][:, m:]) < 0.5)
  for i in range(b):
    order = np.lexsort(boxes[i].T[::-1])
    got_order = np.lexsort(np.asarray(out['boxes'][i, :m]).T[::-1])
    np.testing.assert_allclose(np.asarray(out['boxes'][i, :m])[got_order], boxes[i][order], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out['classes'][i, :m])[got_order], classes[i][order])


def test_decode_keeps_local_maxima_only_and_image_scores():
  heat = np.full((1, 6, 6, 3), -10.0, np.float32)
  heat[0, 2, 2, 1], heat[0, 2, 3, 1], heat[0, 3, 2, 1] = 3.0, 2.0, 1.0  # One blob: a single peak.
  heat[0, 5, 5, 0] = 0.5
  heat[0, 2, 3, 2] = 1.5  # Same cell as a suppressed one, other class: kept.
  det = {'heatmap': jnp.asarray(heat), 'size': jnp.ones((1, 6, 6, 2)) * 2, 'offset': jnp.full((1, 6, 6, 2), 0.5)}
  out = jax.jit(H.decode_detections, static_argnames='max_detections')(det, max_detections=4)
  sig = lambda v: 1 / (1 + np.exp(-v))
  np.testing.assert_allclose(np.asarray(out['scores'][0, :3]), sig(np.array([3.0, 1.5, 0.5])), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out['classes'][0, :3]), [1, 2, 0])
  np.testing.assert_allclose(np.asarray(out['boxes'][0, 0]), np.array([1.5, 1.5, 3.5, 3.5]) * 8)
  np.testing.assert_allclose(np.asarray(H.image_level_scores(det)), sig(heat.max(axis=(1, 2))), rtol=1e-6)
  image = np.array([[2.0, -1.0, 0.0]], np.float32)  # With the image-level branch its logits decide.
  np.testing.assert_allclose(np.asarray(H.image_level_scores(dict(det, image=jnp.asarray(image)))), sig(image),
                             rtol=1e-6)


@pytest.mark.parametrize('method', ['bilinear', 'nearest'])
def test_upsample_matches_jax_image_resize(method):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 7, 3)), jnp.float32)
  sizes = [(10, 14), (20, 28), (15, 7), (40, 21), (11, 9)]  # x2, x4, x3 / x1, x8 / x3, non-integer.
  run = jax.jit(lambda x: [(H.upsample(x, hw, method), jax.image.resize(x, (2, *hw, 3), method)) for hw in sizes])
  for hw, (got, want) in zip(sizes, run(x)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, err_msg=str(hw))
