"""A frozen batch norm folded into the conv before it (norm.FrozenBatchNorm, out_scale, bias_act) against flax's
nn.Conv -> nn.BatchNorm on running statistics -> activation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import convs
from clflax.models import norm

REFERENCE_ACTIVATIONS = {'linear': lambda t: t, 'silu': jax.nn.silu, 'relu6': jax.nn.relu6}
CHANNELS = 6


def _our_conv(kind):
  return {'pointwise': lambda: convs.PointwiseConv(CHANNELS, use_bias=False, name='conv'),
          'depthwise': lambda: convs.DepthwiseConv(3, 2, impl='shifted', name='conv'),
          'dense': lambda: convs.Conv(CHANNELS, 3, 2, use_bias=True, name='conv')}[kind]()


def _flax_conv(kind):
  return {'pointwise': lambda: nn.Conv(CHANNELS, (1, 1), use_bias=False, name='conv'),
          'depthwise': lambda: nn.Conv(CHANNELS, (3, 3), 2, padding='SAME', feature_group_count=CHANNELS,
                                       use_bias=False, name='conv'),
          'dense': lambda: nn.Conv(CHANNELS, (3, 3), 2, padding='SAME', name='conv')}[kind]()


class _Folded(nn.Module):
  kind: str
  act: str

  @nn.compact
  def __call__(self, x):
    a, b = norm.FrozenBatchNorm(epsilon=1e-3, name='bn')(CHANNELS)
    return norm.bias_act(_our_conv(self.kind)(x, out_scale=a), b, self.act)


class _Reference(nn.Module):
  kind: str
  act: str

  @nn.compact
  def __call__(self, x):
    y = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(_flax_conv(self.kind)(x))
    return REFERENCE_ACTIVATIONS[self.act](y)


@pytest.mark.parametrize('kind,act', [('pointwise', 'silu'), ('pointwise', 'linear'), ('depthwise', 'relu6'),
                                      ('depthwise', 'silu'), ('dense', 'silu')])
def test_folded_frozen_batch_norm_is_conv_then_flax_batch_norm_with_the_same_gradients(kind, act):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0, 2, (2, 7, 6, CHANNELS)), jnp.float32)
  ours, reference = _Folded(kind, act), _Reference(kind, act)
  variables, expected_variables = ours.init(jax.random.PRNGKey(0), x), reference.init(jax.random.PRNGKey(0), x)
  # Same collections, names and shapes: checkpoints and imported weights fit both; nn.BatchNorm's initial values.
  assert jax.tree.structure(variables) == jax.tree.structure(expected_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected_variables)):
    assert a.shape == b.shape and a.dtype == b.dtype
  for a, b in zip(jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(expected_variables['batch_stats'])):
    assert np.array_equal(a, b)
  np.testing.assert_array_equal(variables['params']['bn']['scale'], expected_variables['params']['bn']['scale'])
  # Statistics and affine parameters away from the identity (a crosses relu6's 0 and 6 on these inputs).
  bn = {'scale': rng.uniform(0.5, 3, CHANNELS), 'bias': rng.normal(0, 1, CHANNELS)}
  stats = {'mean': rng.normal(0, 1, CHANNELS), 'var': rng.uniform(0.2, 3, CHANNELS)}
  params = dict(variables['params'], bn=jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), bn))
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero conv bias too.
  fixed = {'batch_stats': {'bn': jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), stats)}}
  run = lambda module, p, xx: module.apply(dict(fixed, params=p), xx)
  np.testing.assert_allclose(run(ours, params, x), run(reference, params, x), rtol=1e-5, atol=1e-5)

  def check(grad_fn):
    for a, b in zip(jax.tree.leaves(grad_fn(ours)), jax.tree.leaves(grad_fn(reference))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  loss = lambda module, p, xx: jnp.sum(jnp.sin(run(module, p, xx)))
  check(lambda m: jax.grad(lambda p, xx: loss(m, p, xx), argnums=(0, 1))(params, x))
  # Per-example parameter gradients (vmap, as EWC's Fisher).
  check(lambda m: jax.vmap(jax.grad(lambda p, xi: loss(m, p, xi[None])), (None, 0))(params, x))


def test_bias_act_refuses_an_unknown_activation():
  with pytest.raises(ValueError, match="act must be one of .*'gelu'"):
    norm.bias_act(jnp.ones((1, 2)), jnp.zeros(2), 'gelu')
