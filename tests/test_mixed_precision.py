"""Mixed precision (`config.model.dtype='bfloat16'`): every convolution and matmul of the forward pass runs in
bfloat16 while parameters, gradients, batch-norm statistics and outputs stay float32; the classification stage of
the bundled sample trains to about the float32 result. (Every strategy's bfloat16 step: test_strategies_conformance.)"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from clflax import cli
from clflax.trainer import setup
from clflax.trainer import steps
from configs import agem


def _config(dtype, tasks=('seg', 'det', 'cls')):
  config = agem.get_config('smoke')
  config.model.dtype = dtype
  config.model.image_size = 32
  config.tasks = tasks
  return config


def _dtypes_of(jaxpr, primitives) -> set:
  """Operand dtypes of every equation of `primitives`, sub-jaxprs (custom VJPs, scans) included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      found |= {str(v.aval.dtype) for v in eqn.invars}
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          found |= _dtypes_of(inner, primitives)
  return found


def _model_and_batch(dtype):
  """The smoke config's model in `dtype`, its (float32) variables and a 2-image batch."""
  model = setup.build_model(_config(dtype))
  variables = jax.jit(model.init, static_argnames=('task', 'train'))(
      jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), task='cls', train=False)
  return model, variables, {'image': jnp.full((2, 32, 32, 3), 128, jnp.uint8)}


def test_bfloat16_forward_computes_in_bfloat16_and_returns_float32():
  model, variables, batch = _model_and_batch('bfloat16')

  def forward(params, task):
    return steps.forward(model, params, variables['batch_stats'], batch, task, jax.random.PRNGKey(1), train=True)

  for task in ('seg', 'det', 'cls'):
    jaxpr = jax.make_jaxpr(lambda p: forward(p, task))(variables['params']).jaxpr  # noqa: B023
    assert _dtypes_of(jaxpr, ('conv_general_dilated', 'dot_general')) == {'bfloat16'}, task

  @jax.jit
  def every_head(params):  # Every head's outputs and new statistics, and the gradient of their sum (one compile).
    def total(p):
      runs = {t: forward(p, t) for t in ('seg', 'det', 'cls')}
      return sum(jnp.sum(x) for x in jax.tree.leaves({t: r[0] for t, r in runs.items()})), runs
    return jax.grad(total, has_aux=True)(params)

  grads, runs = every_head(variables['params'])
  floats = jax.tree.leaves((grads, runs))
  assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  assert all(np.isfinite(np.asarray(x)).all() for x in floats)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads['backbone']))


def test_float32_forward_has_no_bfloat16():
  model, variables, batch = _model_and_batch('float32')
  jaxpr = jax.make_jaxpr(lambda p: steps.forward(model, p, variables['batch_stats'], batch, 'seg', None,
                                                 train=False))(variables['params']).jaxpr
  assert _dtypes_of(jaxpr, ('conv_general_dilated', 'dot_general')) == {'float32'}


def _run(tmp_path, dtype, tasks, **train):
  config = _config(dtype, tasks)
  for key, value in train.items():
    config.train[key] = value
  workdir = tmp_path / f'{dtype}_{"_".join(tasks)}'
  assert cli.run(config, str(workdir)) == 0
  return json.loads((workdir / 'results.json').read_text())


def test_cls_stage_in_bfloat16_trains_like_float32(tmp_path):
  losses, top1 = {}, {}
  for dtype in ('float32', 'bfloat16'):
    results = _run(tmp_path, dtype, ('cls',), steps_per_epoch=5)
    curve = np.asarray(results['curves']['cls'])[:, 1]
    losses[dtype], top1[dtype] = curve, results['metrics']['top1'][-1][0]
  print(f'cls stage, bundled sample: float32 loss {losses["float32"][0]:.4f} -> {losses["float32"][-1]:.4f}, '
        f'top-1 {top1["float32"]:.2f}; bfloat16 loss {losses["bfloat16"][0]:.4f} -> {losses["bfloat16"][-1]:.4f}, '
        f'top-1 {top1["bfloat16"]:.2f}')
  # bfloat16 keeps 8 bits of mantissa: the same loss curve to a few percent step by step, the same learning.
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.1)
  assert abs(losses['bfloat16'].mean() / losses['float32'].mean() - 1) < 0.03
  assert abs(top1['bfloat16'] - top1['float32']) <= 25.0  # 8 smoke eval images: one image is 12.5 points.
