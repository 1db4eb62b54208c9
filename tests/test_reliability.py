"""Reliability: exact resume after a crash at every point of a run, determinism, no re-trace, the NaN guard.

A small real run (tiny model, 32 px, in-memory data, EWC + A-GEM so that Fisher, anchors and memories are all
part of the state) goes through `run.main` as launch.py calls it. Crashes come from the CLFLAX_FAULT hook
(clflax.checkpoints): in-process as a raised SimulatedCrash, and once as a real SIGKILL of a subprocess.
"""
import collections
import json
import os
import pathlib
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from fake_data import arrays as fake_arrays
from clflax.trainer import hooks
from clflax.trainer import checkpoints
from clflax.data import inputs
from clflax import cli
from clflax.trainer import steps

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SIZE, _BATCH, _STEPS, _EPOCHS = 32, 2, 3, 2


def _config(seed=0):
  sys.path.insert(0, str(_ROOT))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.seed = seed
  config.tasks = ('cls', 'seg')
  config.model.image_size = _SIZE
  config.train.batch_size = config.train.eval_batch_size = _BATCH
  config.train.epochs = dict(seg=_EPOCHS, det=_EPOCHS, cls=_EPOCHS)
  config.train.steps_per_epoch = _STEPS
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2  # In-stage checkpoints too.
  config.train.early_stopping_patience = 10
  config.strategy.names = ('ewc', 'agem')
  config.strategy.agem.memory_per_task = config.strategy.agem.ref_batch = _BATCH
  return config


def _load(config):
  """Fixed random data for the runs (the seed only drives the model and the batch order)."""
  train = {t: fake_arrays(t, _BATCH * _STEPS, i, _SIZE) for i, t in enumerate(config.tasks)}
  val = {t: fake_arrays(t, _BATCH, 10 + i, _SIZE) for i, t in enumerate(config.tasks)}
  return inputs.from_arrays(train, val, batch_size=_BATCH, eval_batch_size=_BATCH, seed=config.seed)


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return {k: results[k] for k in ('metrics', 'baseline', 'curves') if k in results}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run's results; it also counts the train step's traces (once per stage: no re-trace)."""
  workdir = tmp_path_factory.mktemp('reference')
  traces = collections.Counter()
  real_step = steps.train_step

  def counting_step(*args, task, **kwargs):
    traces[task] += 1  # Runs only while JAX traces the step.
    return real_step(*args, task=task, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, 'train_step', counting_step)
    assert cli.run(_config(), str(workdir), data=_load(_config())) == 0
  return _results(workdir), traces, workdir


def test_each_stage_traces_its_step_once(reference):
  _, traces, workdir = reference
  assert traces == {'cls': 1, 'seg': 1}  # 2 epochs x 3 steps per stage, with mid-epoch host reads and saves...
  with open(workdir / 'results.json') as f:
    curves = json.load(f)['curves']
  assert {t: len(c) for t, c in curves.items()} == {'cls': _EPOCHS * _STEPS, 'seg': _EPOCHS * _STEPS}  # ...all ran.


def test_resume_after_a_crash_at_every_point_is_exact(reference, tmp_path, monkeypatch):
  # Stage 1 checkpoints after steps 2, 3 (epoch end), 4 and 6 (epoch end), then its snapshot; stage 2 likewise.
  # First a real SIGKILL of a subprocess mid-stage 1, after step 5: it resumes from step 4's checkpoint.
  env = dict(os.environ, PYTHONPATH=str(_ROOT), JAX_PLATFORMS='cpu', **{hooks.FAULT_ENV: 'step:5'})
  env.pop(hooks.FAULT_ACTION_ENV, None)
  killed = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=_ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]  # Died by SIGKILL: no cleanup, no flush.
  assert not (tmp_path / 'results.json').exists() and any((tmp_path / 'checkpoints').iterdir())
  # Then, in-process, each run crashes at the next point and the following run resumes from what it left.
  faults = [
      'progress_save:2',   # Inside the write of stage 2's step-2 checkpoint: its temporary folder is left behind.
      'eval:2',            # Validating stage 2's second epoch.
      'consolidate:1',     # After stage 2's Fisher / memory update, before its snapshot.
      'stage_save:1',      # Inside the write of stage 2's snapshot.
  ]
  monkeypatch.setenv(hooks.FAULT_ACTION_ENV, 'raise')
  for fault in faults:
    monkeypatch.setenv(hooks.FAULT_ENV, fault)
    with pytest.raises(hooks.SimulatedCrash, match=fault.split(':')[0]):
      cli.run(_config(), str(tmp_path), data=_load(_config()))
  monkeypatch.delenv(hooks.FAULT_ENV)
  assert cli.run(_config(), str(tmp_path), data=_load(_config())) == 0
  assert (tmp_path / 'summary.md').exists()
  # Bitwise (JSON floats round-trip exactly): so also the same config and seed give the same results.
  assert _results(tmp_path) == reference[0]


def test_nan_guard_stops_with_exit_3_and_keeps_only_finite_checkpoints(reference, tmp_path, capsys):
  config = _config(seed=1)  # Another seed: its stage 1 must differ from the reference's (determinism is seeded).
  config.strategy.names = ('naive',)  # The guard does not depend on the strategy; plain steps compile 3x faster.
  config.train.loss_weights.seg = 1e38  # Stage 1 (cls) trains normally; stage 2's loss overflows to inf.
  assert cli.run(config, str(tmp_path), data=_load(config)) == 3
  err = capsys.readouterr().err
  assert 'non-finite' in err and 'stage 2/2 (seg), step 1' in err and 'Traceback' not in err
  assert not (tmp_path / 'results.json').exists()
  saved = [p for p in tmp_path.glob('checkpoints/**/state') if 'tmp' not in str(p.relative_to(tmp_path))]
  assert saved, 'stage 1 should have left good checkpoints'
  for path in saved:
    arrays = ocp.StandardCheckpointer().restore(path)
    assert not checkpoints.non_finite_paths(arrays), f'{path} holds non-finite values'
  _, meta = checkpoints.latest_meta(checkpoints.stage_manager(str(tmp_path)))
  assert meta['curves']['cls'] != reference[0]['curves']['cls']  # Stage 1's losses, step by step.


if __name__ == '__main__':  # The subprocess side of the SIGKILL test: the same run through run.main.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_disable_most_optimizations', True)  # As conftest.py (its cache folder: the environment's).
  sys.exit(cli.run(_config(), sys.argv[1], data=_load(_config())))
