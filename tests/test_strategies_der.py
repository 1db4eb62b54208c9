"""DER / DER++ losses against NumPy, and logits stored in the replay buffer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.strategies import der
from clflax.strategies import replay


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


_loss = jax.jit(der.loss)


def test_der_and_der_plus_plus_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  stored = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  mse = np.mean((logits.astype(np.float64) - stored) ** 2)
  ce = -np.mean(_np_log_softmax(logits.astype(np.float64))[np.arange(6), labels])
  np.testing.assert_allclose(_loss(logits, stored, None, 0.3), 0.3 * mse,
                             rtol=1e-6)
  np.testing.assert_allclose(_loss(logits, stored, labels, 0.3, 0.7),
                             0.3 * mse + 0.7 * ce, rtol=1e-6)
  # beta = 0 ignores the labels: DER.
  np.testing.assert_allclose(der.loss(logits, stored, labels, 0.3, 0.0),
                             0.3 * mse, rtol=1e-6)


def test_dense_logits_with_void_labels_and_mask():
  # Segmentation-like [B, H, W, C] logits, label 255 = void, a padded example.
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  stored = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(3, 2, 2))
  labels[0, 0, 1] = 255
  mask = np.ones((3, 2, 2), np.float32)
  mask[2] = 0  # Third replay slot is padding.
  keep = mask.astype(bool)
  sq = (logits.astype(np.float64) - stored) ** 2
  mse = sq[keep].mean()
  counted = keep & (labels < 4)
  nll = -np.take_along_axis(_np_log_softmax(logits.astype(np.float64)),
                            np.where(labels < 4, labels, 0)[..., None], -1)[..., 0]
  ce = nll[counted].mean()
  got = _loss(logits, stored, labels, 1.0, 2.0, mask)
  np.testing.assert_allclose(got, mse + 2.0 * ce, rtol=1e-6)
  # Nothing counted (empty buffer): exactly 0, not NaN.
  assert float(_loss(logits, stored, labels, 1.0, 2.0, 0 * mask)) == 0.0


def test_gradient_flows_to_logits_only():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  stored = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  grad_fn = jax.jit(jax.grad(der.loss, argnums=(0, 1)))
  g_logits, g_stored = grad_fn(logits, stored, None, 0.5)
  # d/dl of alpha * mean((l - z)^2) = 2 alpha (l - z) / N.
  np.testing.assert_allclose(g_logits, 2 * 0.5 * (logits - stored) / 12,
                             rtol=1e-5)
  np.testing.assert_array_equal(g_stored, np.zeros((4, 3)))


def test_buffer_keeps_each_example_with_its_logits():
  example = {'x': jnp.zeros((2,), jnp.float32), 'y': jnp.zeros((), jnp.int32)}
  buf = der.init_buffer(4, example, jax.ShapeDtypeStruct((3,), jnp.float32),
                        dtype=jnp.bfloat16)
  assert buf.data['logits'].shape == (4, 3)
  assert buf.data['logits'].dtype == jnp.bfloat16
  add = jax.jit(replay.add)
  for start in range(0, 12, 3):  # 12 examples stream through 4 slots.
    ids = np.arange(start, start + 3)
    batch = {'x': np.stack([ids, -ids], 1).astype(np.float32),
             'y': ids.astype(np.int32)}
    logits = np.stack([ids, 2 * ids, 3 * ids], 1).astype(np.float32)
    buf = add(buf, der.with_logits(batch, logits, jnp.bfloat16),
              jax.random.key(start))
  sample = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.key(9), 4)
  rest, logits = der.split_logits(sample)
  ids = np.asarray(rest['y'])
  assert len(set(ids.tolist())) == 4  # Without replacement.
  np.testing.assert_array_equal(rest['x'][:, 0], ids)
  np.testing.assert_array_equal(np.asarray(logits, np.float32),
                                np.stack([ids, 2 * ids, 3 * ids], 1))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='same shape'):
    der.loss(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match='needs buffer_labels'):
    der.loss(jnp.ones((2, 3)), jnp.ones((2, 3)), None, 1.0, 0.5)
  with pytest.raises(ValueError, match='alpha must be >= 0'):
    der.loss(jnp.ones((2, 3)), jnp.ones((2, 3)), None, -1.0)
  with pytest.raises(ValueError, match='labels shape'):
    der.label_loss(jnp.ones((2, 3)), jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match='must be a dict'):
    der.with_logits((jnp.ones(2),), jnp.ones(3))
  with pytest.raises(ValueError, match='already have'):
    der.with_logits({'logits': jnp.ones(2)}, jnp.ones(3))
