"""EfficientNet: architecture sizes, features, drop-connect, batch norm (its convolutions: test_models_convs.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import efficientnet as E


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


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
