"""The models' convolutions: depthwise against brute force, pointwise and dense k x k against nn.Conv."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import convs


@pytest.mark.parametrize('batch,h,w,k,stride', [(1, 7, 8, 3, 1), (2, 9, 9, 3, 2), (3, 8, 6, 3, 2), (2, 6, 7, 5, 1),
                                              (2, 5, 6, 4, 1)])  # An even kernel: uneven 'SAME' pads.
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


def _depthwise_numpy(x, kernel, stride):
  """Brute force: every output pixel is a k x k window dot the channel's kernel (TF SAME pads)."""
  b, h, w, c = x.shape
  k = kernel.shape[0]
  oh, ow = -(-h // stride), -(-w // stride)
  pad_h = max((oh - 1) * stride + k - h, 0)
  pad_w = max((ow - 1) * stride + k - w, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  out = np.zeros((b, oh, ow, c), np.float64)
  for i in range(oh):
    for j in range(ow):
      win = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j, :] = np.einsum('bhwc,hwc->bc', win, kernel[:, :, 0, :])
  return out


# (kernel, stride, batch): the kernel gradient pre-sums slices of the batch x output rows in up to 8 groups
# (9 rows of one example in 3 groups; 45 rows of 9 examples in 5 groups that straddle examples).
CASES = [(3, 1, 1), (3, 2, 3), (5, 1, 8), (5, 2, 9)]


@pytest.fixture(scope='module')
def depthwise_results():
  """Outputs and (input, kernel) gradients of both implementations, all cases in one jit."""
  rng = np.random.default_rng(0)
  data = {}
  for k, s, b in CASES:
    x = rng.normal(size=(b, 9, 8, 5)).astype(np.float32)  # Odd and even sides: both pad cases.
    kernel = rng.normal(size=(k, k, 1, 5)).astype(np.float32)
    cot = rng.normal(size=(b, -(-9 // s), -(-8 // s), 5)).astype(np.float32)
    data[(k, s, b)] = (x, kernel, cot)

  @jax.jit
  def run(data):
    res = {}
    for (k, s, b), (x, kernel, cot) in data.items():
      for impl in ('xla', 'shifted'):
        f = lambda a, b, impl=impl, s=s: convs.depthwise_conv(a, b, s, impl)
        grads = jax.grad(lambda a, b, f=f, cot=cot: jnp.sum(f(a, b) * cot), argnums=(0, 1))(x, kernel)
        res[(k, s, b, impl)] = (f(x, kernel),) + grads
    return res

  out = run(data)
  return data, {key: tuple(np.asarray(a) for a in value) for key, value in out.items()}


@pytest.mark.parametrize('kernel_size,stride,batch', CASES)
def test_depthwise_impls_agree_with_brute_force_and_each_other(depthwise_results, kernel_size, stride, batch):
  data, res = depthwise_results
  x, kernel, cot = (a.astype(np.float64) for a in data[(kernel_size, stride, batch)])
  xla, shifted = res[(kernel_size, stride, batch, 'xla')], res[(kernel_size, stride, batch, 'shifted')]
  ref = _depthwise_numpy(x, kernel, stride)
  np.testing.assert_allclose(xla[0], ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(shifted[0], ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(xla[1:], shifted[1:]):  # Input and kernel gradients.
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  # The kernel gradient of a linear map: the cotangent dotted with each basis kernel's output.
  gk = np.zeros(kernel.shape)
  for dy in range(kernel_size):
    for dx in range(kernel_size):
      basis = np.zeros_like(kernel)
      basis[dy, dx, 0, :] = 1.0
      gk[dy, dx, 0, :] = np.einsum('bhwc,bhwc->c', _depthwise_numpy(x, basis, stride), cot)
  np.testing.assert_allclose(shifted[2], gk, rtol=1e-4, atol=1e-3)


def test_depthwise_auto_and_bad_impl():
  assert convs.resolve_depthwise('auto') == ('shifted' if jax.default_backend() == 'cpu' else 'xla')
  with pytest.raises(ValueError, match='depthwise'):
    convs.resolve_depthwise('fast')
  with pytest.raises(ValueError, match='channels'):
    convs.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 4)))


def test_pointwise_conv_is_flax_conv_1x1_with_the_same_parameters():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 7))
  for use_bias in (False, True):
    ours, flax_conv = convs.PointwiseConv(4, use_bias=use_bias), nn.Conv(4, (1, 1), use_bias=use_bias)
    variables = ours.init(jax.random.PRNGKey(1), x)
    reference = flax_conv.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference)
    identical = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, reference)
    assert all(jax.tree.leaves(identical))  # Same initialiser and names: same weights for the same key.
    if use_bias:
      variables = jax.tree.map(lambda a: a + 0.5, variables)  # A non-zero bias too.
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5)
    # Its own backward (`pointwise`): input and parameter gradients of a non-linear loss as nn.Conv's autodiff.
    loss = lambda module, v, x: jnp.sum(jnp.sin(module.apply(v, x)) * jnp.arange(4.0))
    ours_grad = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, x)
    reference_grad = jax.grad(functools.partial(loss, flax_conv), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(ours_grad), jax.tree.leaves(reference_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
