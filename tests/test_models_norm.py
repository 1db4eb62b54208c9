"""FrozenBatchNorm (fused affine + activation) against flax's nn.BatchNorm on running statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import norm

REFERENCE_ACTIVATIONS = {'linear': lambda t: t, 'silu': jax.nn.silu, 'relu6': jax.nn.relu6}


class _Reference(nn.Module):
  act: str

  @nn.compact
  def __call__(self, x):
    y = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return REFERENCE_ACTIVATIONS[self.act](y)


class _Ours(nn.Module):
  act: str

  @nn.compact
  def __call__(self, x):
    return norm.FrozenBatchNorm(self.act, epsilon=1e-3, name='bn')(x)


@pytest.mark.parametrize('act', ['linear', 'silu', 'relu6'])
def test_frozen_batch_norm_is_flax_batch_norm_on_running_statistics_with_the_same_gradients(act):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 3, (2, 5, 4, 6)), jnp.float32)  # Wide enough to cross relu6's 0 and 6.
  ours, reference = _Ours(act), _Reference(act)
  variables, expected_variables = ours.init(jax.random.PRNGKey(0), x), reference.init(jax.random.PRNGKey(0), x)
  # Same collections, names, shapes and initial values: checkpoints and imported weights fit both.
  assert jax.tree.structure(variables) == jax.tree.structure(expected_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected_variables)):
    assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
  # Statistics and affine parameters away from the identity.
  variables = {'params': {'bn': {'scale': jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32),
                                 'bias': jnp.asarray(rng.normal(0, 1, 6), jnp.float32)}},
               'batch_stats': {'bn': {'mean': jnp.asarray(rng.normal(0, 1, 6), jnp.float32),
                                      'var': jnp.asarray(rng.uniform(0.2, 3, 6), jnp.float32)}}}
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)

  def grads(module):
    loss = lambda params, x: jnp.sum(jnp.sin(module.apply(dict(variables, params=params), x)))
    return jax.grad(loss, argnums=(0, 1))(variables['params'], x)

  for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def per_example(module):  # As EWC's Fisher: vmap of the parameter gradient.
    loss = lambda params, xi: jnp.sum(jnp.sin(module.apply(dict(variables, params=params), xi[None])))
    return jax.vmap(jax.grad(loss), (None, 0))(variables['params'], x)

  for a, b in zip(jax.tree.leaves(per_example(ours)), jax.tree.leaves(per_example(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_frozen_batch_norm_refuses_an_unknown_activation():
  with pytest.raises(ValueError, match="act must be one of .*'gelu'"):
    norm.FrozenBatchNorm('gelu').init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
