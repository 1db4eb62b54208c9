"""convs.Conv: nn.Conv's parameters and outputs, and gradients (batched and per example) equal to its autodiff."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import convs


@pytest.mark.parametrize('batch,h,w,k,stride', [(1, 7, 8, 3, 1), (2, 9, 9, 3, 2), (3, 8, 6, 3, 2), (2, 6, 7, 5, 1)])
def test_conv_is_flax_conv_with_the_same_gradients(batch, h, w, k, stride):
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, h, w, 4))
  ours, flax_conv = convs.Conv(5, k, stride), nn.Conv(5, (k, k), (stride, stride), padding='SAME')
  variables, reference = ours.init(jax.random.PRNGKey(1), x), flax_conv.init(jax.random.PRNGKey(1), x)
  identical = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), variables, reference)
  assert all(jax.tree.leaves(identical))  # Same names, shapes and initialisers: same weights for the same key.
  variables = jax.tree.map(lambda a: a + 0.3, variables)  # A non-zero bias too.
  np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)
  loss = lambda module, v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  def check(grad_fn):
    for a, b in zip(jax.tree.leaves(grad_fn(ours)), jax.tree.leaves(grad_fn(flax_conv))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  check(lambda m: jax.grad(functools.partial(loss, m), argnums=(0, 1))(variables, x))
  # Per-example parameter gradients (vmap, as EWC's Fisher): the kernel gradient's own path under vmap.
  check(lambda m: jax.vmap(jax.grad(lambda v, xi: loss(m, v, xi[None])), (None, 0))(variables, x))
