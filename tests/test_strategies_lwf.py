"""LwF distillation losses against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.strategies import lwf


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_sigmoid(z):
  return 1 / (1 + np.exp(-z))


# Jitted once per shape: cheaper than op-by-op dispatch on 2 cores.
_soft = jax.jit(lwf.distillation_loss, static_argnums=2)
_binary = jax.jit(lwf.binary_distillation_loss, static_argnums=2)
_soft_grad = jax.jit(jax.grad(lwf.distillation_loss), static_argnums=2)
_binary_grad = jax.jit(jax.grad(lwf.binary_distillation_loss), static_argnums=2)


def _logits(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


@pytest.mark.parametrize('shape,temperature', [((5, 4), 1.0),
                                               ((2, 3, 3, 6), 4.0)])
def test_softmax_distillation_matches_numpy(shape, temperature):
  s, t = _logits(shape, 0), _logits(shape, 1)
  p = _np_softmax(t.astype(np.float64) / temperature)
  q = _np_softmax(s.astype(np.float64) / temperature)
  # Hinton soft-target cross-entropy minus the teacher entropy (a constant).
  ce = -np.sum(p * np.log(q), -1)
  ent = -np.sum(p * np.log(p), -1)
  want = temperature ** 2 * np.mean(ce - ent)
  got = _soft(s, t, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Gradient: T^2 * d/ds CE = T * (q - p) / (number of examples).
  grad = _soft_grad(s, t, temperature)
  n = np.prod(shape[:-1])
  np.testing.assert_allclose(grad, temperature * (q - p) / n, rtol=1e-4,
                             atol=1e-7)


def test_mask_selects_positions():
  s, t = _logits((2, 4, 5), 2), _logits((2, 4, 5), 3)
  mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
  per = np.sum(_np_softmax(t / 2.0) * (np.log(_np_softmax(t / 2.0))
                                       - np.log(_np_softmax(s / 2.0))), -1)
  want = 4.0 * np.sum(per * mask) / mask.sum()
  np.testing.assert_allclose(_soft(s, t, 2.0, mask), want, rtol=1e-5)
  assert _soft(s, t, 2.0, np.zeros((2, 4))) == 0.0


def test_zero_and_stationary_at_teacher():
  t = _logits((6, 7), 4)
  for loss, grad_fn in ((_soft, _soft_grad), (_binary, _binary_grad)):
    assert abs(float(loss(t, t, 2.0))) < 1e-6
    np.testing.assert_allclose(grad_fn(t, t, 2.0), np.zeros_like(t), atol=1e-6)
    assert float(loss(t + _logits((6, 7), 5), t, 2.0)) > 0


def test_binary_distillation_matches_numpy():
  shape, temperature = (3, 2, 5), 2.0
  s, t = _logits(shape, 6).astype(np.float64), _logits(shape, 7)
  p = _np_sigmoid(t.astype(np.float64) / temperature)
  q = _np_sigmoid(s / temperature)
  kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
  want = temperature ** 2 * np.mean(kl.sum(-1))
  got = _binary(s.astype(np.float32), t, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_binary_is_stable_for_large_logits():
  s = jnp.array([[60.0, -60.0]])
  t = jnp.array([[-60.0, 60.0]])
  got = _binary(s, t, 1.0)
  assert np.isfinite(float(got)) and float(got) > 100  # ~ 2 * 120 nats.


def test_bad_input():
  with pytest.raises(ValueError, match='same shape'):
    lwf.distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='temperature'):
    lwf.distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0.0)
  with pytest.raises(ValueError, match='mask'):
    lwf.binary_distillation_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                                 mask=jnp.ones((3,)))
