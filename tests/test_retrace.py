"""The jitted train step keeps one executable: its outputs go back in without a re-trace or recompilation.

(That the trainer traces each stage's step once over a whole run is checked in test_reliability.py.)
"""
import importlib.util
import pathlib

import jax
import numpy as np

from fake_data import arrays as fake_arrays
from clflax.trainer import setup
from clflax.trainer import optim
from clflax.trainer import steps
from clflax.trainer import train

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


def test_jitted_step_keeps_one_executable():
  """The state that comes out of a step goes back in without a new cache entry (types, shardings, weak types)."""
  config = _config(('naive',), ('cls',))
  model = setup.build_model(config)
  from clflax.models import multitask  # pylint: disable=g-import-not-at-top
  variables = multitask.init_variables(model, jax.random.PRNGKey(0), _SIZE)
  tx = optim.make_tx(config, steps_per_epoch=_STEPS)
  state = optim.initial_state(config, variables, tx)
  step = steps.jit_train_step(model, tx, 'cls', (), config)
  data = fake_arrays('cls', _BATCH, 0, _SIZE)
  data['valid'] = np.ones(_BATCH, bool)
  for _ in range(3):
    state, _ = step(state, data, steps.Context({}, {}))
  assert step._cache_size() == 1  # pylint: disable=protected-access
