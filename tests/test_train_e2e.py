"""End to end: the real trainer, launched like a user would, on the smoke presets (tiny model, bundled sample)."""
import json
import os

import numpy as np

from clflax.trainer import checkpoints
from clflax.reporting import report
from clflax import cli
from configs import agem


def _run(config, workdir):
  assert cli.run(config, str(workdir)) == 0
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def test_smoke_run_writes_every_report(tmp_path):
  # configs/agem.py:smoke as launch.py runs it. Other strategies end to end: ewc+agem with crashes and resumes in
  # test_reliability.py, naive in its NaN-guard test, vanilla / GEM / DER++ / A-GEM on MNIST in test_classic.py and
  # test_strategies_wiring.py (a naive copy of this run cost a minute of suite time and added no coverage).
  config = agem.get_config('smoke')
  config.train.epochs.seg = config.train.epochs.det = config.train.epochs.cls = 1
  config.train.steps_per_epoch = 2
  config.model.image_size = 32  # Compiles faster than the preset's 64 px; the shapes are otherwise the same.
  results = _run(config, tmp_path)
  report.validate_results(results)  # The results contract.
  assert results['stages'] == ['seg', 'det', 'cls']
  for metric in ('miou', 'map', 'top1'):
    matrix = np.asarray(results['metrics'][metric], float)
    assert matrix.shape == (3, 3)
  assert set(results['criterion']) == {'seg', 'det', 'cls'}
  assert results['params'] > 0 and len(results['timing']['stage_seconds']) == 3
  summary = (tmp_path / 'summary.md').read_text()
  assert 'Stage 1: VOC segmentation' in summary and 'Final' in summary
  assert sorted(os.listdir(tmp_path / 'plots')) == ['evolution.png', 'headline_matrix.png', 'loss_curves.png']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  # Three stage snapshots, each restorable; the last says the run is complete.
  manager = checkpoints.stage_manager(str(tmp_path))
  assert list(manager.all_steps()) == [1, 2, 3]
  step, meta = checkpoints.latest_meta(manager)
  assert step == 3 and meta['stage'] == 3 and len(meta['rows']) == 3
  # Exact resume after crashes at every point: test_reliability.py.
