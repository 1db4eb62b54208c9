"""The jitted train step keeps one executable: its outputs go back in without a re-trace or recompilation.

(That the trainer traces each stage's step once over a whole run is checked in test_reliability.py.)
"""
import importlib.util
import pathlib

import jax
import numpy as np

from clflax import steps
from clflax import train

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SIZE, _BATCH, _STEPS, _EPOCHS = 32, 2, 3, 2


def _config(names, tasks):
  spec = importlib.util.spec_from_file_location('_retrace_default_config', _ROOT / 'configs' / 'default.py')
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  config = default.get_config('smoke')
  config.tasks = tasks
  config.model.image_size = _SIZE
  config.train.batch_size = config.train.eval_batch_size = _BATCH
  config.train.epochs = dict(seg=_EPOCHS, det=_EPOCHS, cls=_EPOCHS)
  config.train.steps_per_epoch = _STEPS
  config.train.log_every_steps = 2  # Host reads of the metrics in the middle of an epoch.
  config.train.checkpoint_every_steps = 2  # And an in-stage checkpoint.
  config.train.early_stopping_patience = 10
  config.strategy.names = names
  return config


def _arrays(task, n, seed):
  rng = np.random.default_rng(seed)
  out = {'image': rng.integers(0, 256, (n, _SIZE, _SIZE, 3), dtype=np.uint8)}
  if task == 'seg':
    out['mask'] = rng.integers(0, 21, (n, _SIZE, _SIZE)).astype(np.int32)
  elif task == 'det':
    corner = rng.uniform(0, _SIZE / 2, (n, 4, 2))
    out['boxes'] = np.concatenate([corner, corner + rng.uniform(4, _SIZE / 2, (n, 4, 2))], -1).astype(np.float32)
    out['classes'] = rng.integers(0, 80, (n, 4)).astype(np.int32)
    out['box_valid'] = np.arange(4)[None] < rng.integers(1, 5, (n, 1))
  else:
    out['label'] = rng.integers(0, 10, n).astype(np.int32)
  return out


def test_jitted_step_keeps_one_executable():
  """The state that comes out of a step goes back in without a new cache entry (types, shardings, weak types)."""
  config = _config(('naive',), ('cls',))
  model = train.build_model(config)
  from clflax.models import multitask  # pylint: disable=g-import-not-at-top
  variables = multitask.init_variables(model, jax.random.PRNGKey(0), _SIZE)
  tx = train.make_tx(config, steps_per_epoch=_STEPS)
  state = train.initial_state(config, variables, tx)
  step = steps.jit_train_step(model, tx, 'cls', (), config)
  data = _arrays('cls', _BATCH, 0)
  data['valid'] = np.ones(_BATCH, bool)
  for _ in range(3):
    state, _ = step(state, data, steps.Context({}, {}))
  assert step._cache_size() == 1  # pylint: disable=protected-access
