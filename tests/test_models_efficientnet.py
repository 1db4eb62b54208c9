"""EfficientNet: depthwise implementations, architecture sizes, features, drop-connect."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import efficientnet as E


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


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


# (kernel, stride, batch): the kernel gradient pre-sums batch slices in groups (none for one example; 3 groups
# of 3 for 9), so the batch sizes vary too.
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
        f = lambda a, b, impl=impl, s=s: E.depthwise_conv(a, b, s, impl)
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
  assert E.resolve_depthwise('auto') == ('shifted' if jax.default_backend() == 'cpu' else 'xla')
  with pytest.raises(ValueError, match='depthwise'):
    E.resolve_depthwise('fast')
  with pytest.raises(ValueError, match='channels'):
    E.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 4)))


def test_round_filters_matches_the_reference_widths():
  # Published channel counts: B7 stem 64, head 2560; B4 stage outputs 24/32/56/112/160/272/448.
  assert E.round_filters(32, 2.0) == 64 and E.round_filters(1280, 2.0) == 2560
  assert [E.round_filters(c, 1.4) for c in (16, 24, 40, 80, 112, 192, 320)] == [24, 32, 56, 112, 160, 272, 448]
  assert E.round_repeats(3, 1.8) == 6 and E.round_repeats(1, 3.1) == 4


@pytest.mark.parametrize('variant,expected', [('b3', 12_233_232), ('lite4', 13_006_568)])
def test_imagenet_param_counts(variant, expected):
  # B3: the torchvision / paper count; Lite4: the TF-Hub model's trainable parameters.
  # (B0 and Lite0 are checked in test_models_multitask, Lite0 also against the .pth.)
  model = E.EfficientNet(variant, include_top=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert _count(shapes['params']) == expected


def test_lite_specifics():
  lite, b0 = E.variant_spec('lite3'), E.variant_spec('b3')
  assert lite.stem_ch == 32 and lite.head_ch == 1280  # Not scaled in Lite.
  assert b0.stem_ch == 40 and b0.head_ch == 1536
  assert lite.stages[0].repeats == 1 and lite.stages[-1].repeats == 1
  assert b0.stages[-1].repeats == 2
  assert all(s.se_ratio == 0 for s in lite.stages) and all(s.se_ratio == 0.25 for s in b0.stages)
  with pytest.raises(ValueError, match='unknown EfficientNet variant'):
    E.variant_spec('b9')


def test_normalize():
  x = np.array([[[[0, 127, 255]]]], np.uint8)
  np.testing.assert_allclose(np.asarray(E.normalize(x, 'lite0')), [[[[-127 / 128, 0, 1]]]], rtol=1e-6)
  mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
  np.testing.assert_allclose(np.asarray(E.normalize(x, 'b0')), (x - mean) / std, rtol=1e-5)


def test_feature_strides_and_channels():
  # Shapes only (no compile). Batch-norm updates in train mode: test_models_multitask.
  for variant, channels in (('tiny', (12, 16, 24, 32)), ('lite0', (24, 40, 112, 1280))):
    model = E.EfficientNet(variant)
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    feats = jax.eval_shape(lambda x, model=model: model.init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert {s: f.shape for s, f in feats.items()} == {
        4: (2, 16, 24, channels[0]), 8: (2, 8, 12, channels[1]), 16: (2, 4, 6, channels[2]),
        32: (2, 2, 3, channels[3])}, variant
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    E.EfficientNet('tiny').init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


def test_drop_connect_drops_the_whole_branch_per_example():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 6, 6, 8)), jnp.float32)
  block = lambda rate: E.MBConv(3, 1, 3, 8, se_ch=2, lite=False, drop_rate=rate)
  variables = jax.jit(lambda xx: block(0.0).init(jax.random.PRNGKey(0), xx, train=False))(x)

  @jax.jit
  def run(v, xx):
    kw = dict(train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(3)})
    return (block(0.0).apply(v, xx, **kw)[0], block(0.5).apply(v, xx, **kw)[0],
            block(0.0).apply(v, xx, train=False), block(0.5).apply(v, xx, train=False))

  full, dropped, eval0, eval5 = run(variables, x)
  branch, got = np.asarray(full - x), np.asarray(dropped - x)
  kept = np.array([np.allclose(g, 2 * b, atol=1e-5) for g, b in zip(got, branch)])
  zero = np.array([np.allclose(g, 0, atol=1e-6) for g in got])
  assert np.all(kept ^ zero)  # Each example: branch scaled by 1/keep, or gone.
  assert 16 < kept.sum() < 48
  np.testing.assert_allclose(np.asarray(eval5), np.asarray(eval0), rtol=1e-6)


@pytest.mark.parametrize('frozen_bn', [False, True])
def test_frozen_bn_trains_on_the_running_statistics_and_keeps_them(frozen_bn):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  model = E.EfficientNet('tiny', drop_connect_rate=0.0, frozen_bn=frozen_bn)
  variables = jax.jit(lambda xx: model.init(jax.random.PRNGKey(0), xx))(x)
  # Running statistics far from this batch's, as pretrained ones are from a small batch of another dataset.
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype), variables['batch_stats'])
  variables = dict(variables, batch_stats=stats)

  @jax.jit
  def run(v, xx):
    trained, updates = model.apply(v, xx, train=True, mutable=['batch_stats'])
    return trained, updates['batch_stats'], model.apply(v, xx, train=False)

  trained, new_stats, evaluated = run(variables, x)
  same = [np.allclose(a, b, rtol=1e-5) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(evaluated))]
  kept = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(stats))]
  if frozen_bn:  # Inference arithmetic in training, statistics untouched.
    assert all(same) and all(kept)
  else:  # Batch statistics normalise, and the running ones move towards them.
    assert not any(same) and not any(kept)


def test_pointwise_conv_is_flax_conv_1x1_with_the_same_parameters():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 7))
  for use_bias in (False, True):
    ours, flax_conv = E.PointwiseConv(4, use_bias=use_bias), nn.Conv(4, (1, 1), use_bias=use_bias)
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
