"""End to end: the user's exact command (`python launch.py --config configs/agem.py:smoke`, no --workdir) on the
bundled sample: the reports, the console a person reads, the default workdir, and a rerun that resumes."""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from clflax.reporting import report
from clflax.trainer import checkpoints

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fewer, smaller steps than the preset (same shapes otherwise): the suite's time. Other strategies end to end:
# test_strategies_conformance.py (every strategy through the trainer), test_reliability.py (crashes, resumes).
_SHORTER = ('--config.train.epochs.seg=1', '--config.train.epochs.det=1', '--config.train.epochs.cls=1',
            '--config.train.steps_per_epoch=2', '--config.model.image_size=32')
# What TensorFlow, XLA and TFDS print unless held back.
_CHATTER = ('absl::InitializeLog', 'oneDNN', 'Downloading and preparing', 'Generating splits', 'Shuffling',
            'Done writing', 'dataset_info.py', 'Load dataset info', 'examples/s]', 'Reusing dataset')


def _launch(cwd, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # As a user's shell has it.
  return subprocess.run([sys.executable, str(_ROOT / 'launch.py'), *flags], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=900, check=False)


def test_the_users_command_writes_every_report_a_quiet_console_and_resumes(tmp_path):
  flags = (f'--config={_ROOT / "configs" / "agem.py"}:smoke', f'--config.data.cache_dir={tmp_path / "tfds"}',
           *_SHORTER)
  first = _launch(tmp_path, *flags)
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / 'runs' / 'agem_smoke'  # runs/<config name>_<arg>, under the current folder.
  lines = [line for line in first.stderr.splitlines() if line.strip()]
  assert 'runs/agem_smoke' in lines[0] and 'strategy agem' in lines[0], lines[0]
  # The console: each line once (timestamps aside), no library chatter, one line per dataset and per program.
  bodies = [re.sub(r'^\d\d:\d\d:\d\d ', '', line) for line in lines]
  repeated = {b for b in bodies if bodies.count(b) > 1}
  assert not repeated, repeated
  chatter = [line for line in lines if any(c in line for c in _CHATTER)]
  assert not chatter, chatter
  assert sum(' prepared ' in b and ' examples from ' in b for b in bodies) == 3
  assert sum(b.startswith('compiled the ') for b in bodies) == 3
  assert any(' stage ETA ' in b and ' run ETA ' in b and ' steps/s ' in b for b in bodies)
  # The end: the stage-wise table and the verdict, then where everything is.
  assert '| **Final** |' in first.stderr and '**Verdict: ' in first.stderr
  for path in ('results.json', 'summary.md', 'plots/loss_curves.png', 'plots/headline_matrix.png',
               'plots/evolution.png'):
    assert f'runs/agem_smoke/{path}' in first.stderr
  assert 'tensorboard --logdir runs/agem_smoke' in first.stderr
  results = json.loads((workdir / 'results.json').read_text())
  report.validate_results(results)  # The results contract.
  assert results['stages'] == ['seg', 'det', 'cls'] and set(results['criterion']) == {'seg', 'det', 'cls'}
  for metric in ('miou', 'map', 'top1'):
    assert np.asarray(results['metrics'][metric], float).shape == (3, 3)
  assert results['params'] > 0 and len(results['timing']['stage_seconds']) == 3
  summary = (workdir / 'summary.md').read_text()
  assert 'Stage 1: VOC segmentation' in summary and 'Final' in summary
  assert sorted(os.listdir(workdir / 'plots')) == ['evolution.png', 'headline_matrix.png', 'loss_curves.png']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  manager = checkpoints.stage_manager(str(workdir))  # Three stage snapshots; the last: the run is complete.
  assert list(manager.all_steps()) == [1, 2, 3]
  step, meta = checkpoints.latest_meta(manager)
  assert step == 3 and meta['stage'] == 3 and len(meta['rows']) == 3
  # The same command again resumes from the last snapshot: nothing is trained twice, the scores are the same.
  second = _launch(tmp_path, *flags)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming from checkpoint' in second.stderr and 'compiled the ' not in second.stderr
  again = json.loads((workdir / 'results.json').read_text())
  assert again['metrics'] == results['metrics'] and again['curves'] == results['curves']
