"""Data parallelism: the trainer's step over a 4-device mesh equals the same step on one device.

The 4 CPU devices need XLA_FLAGS before JAX starts, so that run is a subprocess executing this file; the
single-device reference runs in the test process (conftest: one CPU device). Both go through the trainer's
own pieces (optim.make_tx / initial_state, parallel.make_mesh / replicate / shard_batch,
steps.jit_train_step with the mesh shardings). SGD keeps the comparison tight: Adam's g / sqrt(v) would
amplify float noise of near-zero gradients.
"""
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEPS = 3
_BATCH = 4  # One example per device.
_SIZE = 32


def _config(names):
  spec = importlib.util.spec_from_file_location('_parallel_default_config', _ROOT / 'configs' / 'default.py')
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  config = default.get_config('smoke')
  config.model.image_size = _SIZE
  config.train.batch_size = _BATCH
  config.train.optimizer = 'sgd'
  config.train.learning_rate = 0.05
  config.train.warmup_steps = 0
  config.strategy.names = names
  config.strategy.agem.ref_batch = _BATCH
  config.strategy.agem.memory_per_task = 8
  return config


def _batches(task, n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    batch = {'image': rng.integers(0, 256, (_BATCH, _SIZE, _SIZE, 3), dtype=np.uint8),
             'valid': np.ones(_BATCH, bool)}
    if task == 'cls':
      batch['label'] = rng.integers(0, 10, _BATCH).astype(np.int32)
    else:  # seg
      batch['mask'] = rng.integers(0, 21, (_BATCH, _SIZE, _SIZE)).astype(np.int32)
    out.append(batch)
  return out


def run_steps(names):
  """`_STEPS` steps of the cls head (A-GEM: with a seg memory); returns losses, params, sharding facts."""
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS in the subprocess)
  from clflax.trainer import consolidate
  from clflax.trainer import optim
  from clflax.trainer import parallel
  from clflax.trainer import steps
  from clflax.trainer import setup  # pylint: disable=g-import-not-at-top
  from clflax.models import multitask  # pylint: disable=g-import-not-at-top
  from clflax.strategies import replay  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_disable_most_optimizations', True)
  config = _config(names)
  model = setup.build_model(config)
  variables = multitask.init_variables(model, jax.random.PRNGKey(0), _SIZE)
  tx = optim.make_tx(config, steps_per_epoch=10)
  state = optim.initial_state(config, variables, tx)
  earlier = ('seg',) if 'agem' in names else ()
  memories = {}
  if earlier:
    seg = _batches('seg', 2, seed=1)
    examples = {k: np.concatenate([b[k] for b in seg]) for k in seg[0]}
    memories['seg'] = replay.append(consolidate.empty_memory(examples, 8), examples)
  mesh = parallel.make_mesh()
  state, context = parallel.replicate(mesh, (state, steps.Context(memories, {})))
  step = steps.jit_train_step(model, tx, 'cls', earlier, config, parallel.replicated(mesh),
                              parallel.batch_sharding(mesh))
  losses, shards = [], []
  for batch in _batches('cls', _STEPS, seed=3):
    batch = parallel.shard_batch(mesh, batch)
    shards.append(len({s.device for s in batch['image'].addressable_shards}))
    state, metrics = step(state, batch, context)
    losses.append(float(metrics['total']))
  leaf = jax.tree.leaves(state.params)[0]
  return {'losses': np.asarray(losses),
          'params': np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))]),
          'stats': np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.batch_stats))]),
          'devices': jax.device_count(), 'batch_shards': min(shards),
          'params_replicated': bool(leaf.sharding.is_fully_replicated) and len(leaf.addressable_shards) ==
                               jax.device_count()}


_STRATEGIES = (('naive',), ('agem',))


@pytest.fixture(scope='module')
def multi_device(tmp_path_factory):
  """Both strategies' runs on 4 devices, from ONE subprocess (one start-up and model init for both)."""
  out = tmp_path_factory.mktemp('parallel') / 'multi.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=str(_ROOT))
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=_ROOT, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    return {names: {k.split('/', 1)[1]: f[k] for k in f.files if k.startswith(names[0] + '/')}
            for names in _STRATEGIES}


@functools.lru_cache(maxsize=None)
def _single_device(names):
  return run_steps(names)


def _check_equal(multi, names):
  single = _single_device(names)
  assert single['devices'] == 1
  assert int(multi['devices']) == 4 and int(multi['batch_shards']) == 4 and bool(multi['params_replicated'])
  np.testing.assert_allclose(multi['losses'], single['losses'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(multi['params'], single['params'], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(multi['stats'], single['stats'], rtol=1e-4, atol=1e-5)
  assert len(np.unique(single['losses'])) == _STEPS  # The steps really trained (losses move).
  return single


def test_plain_step_on_four_devices_equals_one(multi_device):
  _check_equal(multi_device[('naive',)], ('naive',))


def test_agem_step_on_four_devices_equals_one(multi_device):
  single = _check_equal(multi_device[('agem',)], ('agem',))
  plain = _single_device(('naive',))
  # Same rng, data and init: A-GEM differs from the plain run only where it projected.
  assert not np.allclose(single['params'], plain['params'], rtol=1e-6, atol=1e-8)


if __name__ == '__main__':  # The multi-device side, run by _multi_device with XLA_FLAGS set.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_disable_most_optimizations', True)  # As conftest.py (its cache folder: the environment's).
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  results = {f'{names[0]}/{key}': value for names in _STRATEGIES for key, value in run_steps(names).items()}
  np.savez(sys.argv[1], **results)
