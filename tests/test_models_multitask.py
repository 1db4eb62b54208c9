"""MultiTaskNet: shapes per head, heads run alone, jitted training steps, parameter budget."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.models import multitask as M

PARTS = {'backbone', 'neck', 'seg_head', 'det_head', 'cls_head'}
# One tiny configuration and init size for every test: the jitted init compiles once.
TINY = M.MultiTaskNet('tiny', neck_channels=16)
IMAGES = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3)).astype(np.uint8)


@pytest.fixture(scope='module')
def tiny_variables():
  return M.init_variables(TINY, jax.random.PRNGKey(0), 32)


def test_init_creates_every_head(tiny_variables):
  assert set(tiny_variables['params']) == PARTS
  assert set(tiny_variables['batch_stats']) == {'backbone'}
  bias = np.asarray(tiny_variables['params']['det_head']['heatmap_out']['bias'])
  np.testing.assert_allclose(bias, np.log(0.1 / 0.9), rtol=1e-6)  # CenterNet prior 0.1.


TRAIN_PARTS = {'seg': {'neck', 'seg_head'}, 'det': {'neck', 'det_head'}, 'cls': {'cls_head'}}


@pytest.fixture(scope='module')
def results(tiny_variables):
  """Everything the tests below check, from ONE jitted function: compiles dominate on CPU."""
  stats = tiny_variables['batch_stats']

  def train_step(task, images, key):
    # Variables WITHOUT the other heads: running them would fail on missing parameters.
    params = {k: v for k, v in tiny_variables['params'].items() if k in TRAIN_PARTS[task] | {'backbone'}}

    def loss_fn(p):
      out, updates = TINY.apply({'params': p, 'batch_stats': stats}, images, task=task, train=True,
                                mutable=['batch_stats'], rngs={'dropout': key})
      return sum(jnp.mean(jnp.sin(x)) for x in jax.tree_util.tree_leaves(out)), (out, updates)
    (loss, (out, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return {'loss': loss, 'out': out, 'grads': grads, 'stats': updates['batch_stats']}

  @jax.jit
  def run(v, images, key):
    return {
        'detect': TINY.apply(v, images, task='detect', train=False),
        'cls_uint8': TINY.apply(v, images, task='cls', train=False),
        'cls_float': TINY.apply(v, images.astype(jnp.float32), task='cls', train=False),
        'train': {task: train_step(task, images, key) for task in TRAIN_PARTS},
    }

  return jax.tree_util.tree_map(np.asarray, run(tiny_variables, jnp.asarray(IMAGES), jax.random.PRNGKey(1)))


def test_outputs_of_every_task(results, tiny_variables):
  out = {task: results['train'][task]['out'] for task in TRAIN_PARTS}
  assert out['seg'].shape == (2, 64, 96, 21)
  assert {k: v.shape for k, v in out['det'].items()} == {
      'heatmap': (2, 8, 12, 80), 'size': (2, 8, 12, 2), 'offset': (2, 8, 12, 2)}
  assert out['cls'].shape == (2, 10)
  detect = results['detect']
  assert {k: v.shape for k, v in detect.items()} == {
      'boxes': (2, 100, 4), 'scores': (2, 100), 'classes': (2, 100), 'image_scores': (2, 80)}
  # At init the heatmap sits near the 0.1 prior.
  assert 0.03 < float(np.median(detect['image_scores'])) < 0.3
  with pytest.raises(ValueError, match='unknown task'):
    TINY.apply(tiny_variables, jnp.asarray(IMAGES), task='depth')


def test_uint8_and_float_pixels_agree(results):
  np.testing.assert_allclose(results['cls_uint8'], results['cls_float'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('task', sorted(TRAIN_PARTS))
def test_jitted_training_step_touches_only_its_head(results, tiny_variables, task):
  got = results['train'][task]
  assert np.isfinite(got['loss'])
  assert set(got['grads']) == TRAIN_PARTS[task] | {'backbone'}
  for part, grads in got['grads'].items():
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves), part
  moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), got['stats'], tiny_variables['batch_stats'])
  assert any(jax.tree_util.tree_leaves(moved))


@pytest.mark.parametrize('backbone,backbone_params', [('lite0', 4_652_008 - 1_281_000),
                                                      ('b0', 5_288_548 - 1_281_000)])
def test_parameter_budget(backbone, backbone_params):
  # ImageNet sizes minus the 1280 x 1000 classifier; counted from shapes only (no compile).
  model = M.MultiTaskNet(backbone)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 64, 64, 3)),
                                             task='cls'))
  counts = M.count_params(shapes)
  assert set(counts) == PARTS | {'total'}
  assert counts['backbone'] == backbone_params
  assert counts['cls_head'] == 1280 * 10 + 10
  assert counts['total'] == sum(counts[p] for p in PARTS)
  assert counts['total'] <= 8_000_000
  with_image = M.count_params(jax.eval_shape(lambda: M.MultiTaskNet(backbone, det_image_head=True).init(
      {'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 64, 64, 3)), task='cls')))
  assert with_image['det_head'] == counts['det_head'] + 1280 * 80 + 80  # Dense on the 1280 top features.
  assert with_image['total'] <= 8_000_000


def test_per_head_necks_keep_seg_and_det_apart():
  model = M.MultiTaskNet('tiny', neck_channels=8, shared_neck=False)
  variables = M.init_variables(model, jax.random.PRNGKey(0), 32)
  assert set(variables['params']) == {'backbone', 'seg_neck', 'det_neck', 'seg_head', 'det_head', 'cls_head'}
  images = jnp.asarray(IMAGES[:, :32, :32])

  @jax.jit
  def check(v):
    det_grads = jax.grad(lambda p: jnp.sum(model.apply(dict(v, params=p), images, task='det')['heatmap']))(
        v['params'])
    moved = dict(v, params=dict(v['params'], det_neck=jax.tree.map(lambda x: x + 1.0, v['params']['det_neck'])))
    return det_grads, model.apply(v, images, task='seg'), model.apply(moved, images, task='seg')

  det_grads, seg, seg_after_det_neck_moved = check(variables)
  for part in ('seg_neck', 'seg_head'):  # The det loss does not reach seg's own layers ...
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(det_grads[part])), part
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(det_grads['det_neck']))
  np.testing.assert_array_equal(seg, seg_after_det_neck_moved)  # ... and det's neck does not reach seg's output.
