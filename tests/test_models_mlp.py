"""MLP: NumPy forward reference, per-example heads, the A-GEM paper init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models.mlp import MLP


def _numpy_forward(params, x, hidden):
  h = x.reshape(x.shape[0], -1).astype(np.float64)
  for i in range(len(hidden)):
    p = params[f'hidden_{i}']
    h = np.maximum(h @ np.asarray(p['kernel']) + np.asarray(p['bias']), 0)
  return h @ np.asarray(params['out']['kernel']) + np.asarray(params['out']['bias'])


def test_single_head_matches_numpy():
  model = MLP(hidden=(16, 8), num_classes=5)
  x = np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32)  # Flattened to 18.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)['params']
  logits = jax.jit(model.apply)({'params': params}, x)
  assert logits.shape == (4, 5)
  np.testing.assert_allclose(np.asarray(logits), _numpy_forward(params, x, (16, 8)), rtol=1e-5, atol=1e-5)


def test_multi_head_selects_each_examples_head():
  model = MLP(hidden=(12,), num_classes=3, num_heads=4)
  x = np.random.default_rng(1).normal(size=(6, 7)).astype(np.float32)
  params = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x, head=0))(x)['params']
  apply = jax.jit(lambda p, x, head: model.apply({'params': p}, x, head=head))
  full = _numpy_forward(params, x, (12,)).reshape(6, 4, 3)  # Head-major output units.
  heads = np.array([0, 3, 1, 2, 3, 0])
  np.testing.assert_allclose(np.asarray(apply(params, x, jnp.asarray(heads))), full[np.arange(6), heads],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(apply(params, x, 2)), full[:, 2], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='pass head='):
    model.apply({'params': params}, x)


def test_agem_paper_init():
  model = MLP(hidden=(256, 256), num_classes=10, init='agem_paper')
  params = jax.jit(model.init)(jax.random.PRNGKey(2), jnp.zeros((1, 784)))['params']
  kernels = np.concatenate([np.asarray(p['kernel']).ravel() for p in params.values()])
  biases = np.concatenate([np.asarray(p['bias']).ravel() for p in params.values()])
  np.testing.assert_array_equal(biases, np.float32(0.1))
  assert np.abs(kernels).max() <= 0.2 + 1e-6  # Truncated at 2 standard deviations.
  # Std of a N(0, 0.1) truncated to +-2 sigma: 0.1 * 0.8796.
  assert abs(kernels.std() - 0.08796) < 0.002 and abs(kernels.mean()) < 0.002
  with pytest.raises(ValueError, match='unknown init'):
    MLP(init='xavier')
