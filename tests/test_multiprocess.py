"""Multi-process runs: TWO processes joined by jax.distributed (CPU collectives, 2 host devices each) run the user's
`launch.py` on the A-GEM smoke config; both killed mid-stage and rerun, they resume to the results of ONE process
on 4 devices with the same global batch.

Each process loads its own half of every global training batch (data/pipeline.py), reads every evaluation batch
whole and gets the eval outputs replicated; process 0 alone writes config.json, the reports and takes the workdir
lock, while Orbax saves from both.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_FLAGS = (f'--config={_ROOT / "configs" / "agem.py"}:smoke', '--config.train.epochs.seg=1',
          '--config.train.epochs.det=1', '--config.train.epochs.cls=1', '--config.train.steps_per_epoch=2',
          '--config.model.image_size=32')
_TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, fault: str = '') -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop('CLFLAX_FAULT', None)
  if fault:
    env['CLFLAX_FAULT'] = fault
  return env


def _one_process(workdir, cache) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(_ROOT / 'launch.py'), *_FLAGS, f'--config.data.cache_dir={cache}',
                         f'--workdir={workdir}'], cwd=workdir.parent, env=_env(4), capture_output=True, text=True,
                        timeout=_TIMEOUT, check=False)


def _two_processes(workdir, cache, fault: str = '') -> list[tuple[int, str]]:
  """Both processes of one run; returns (exit code, stderr) of each (a hung one is killed at the timeout)."""
  port = _free_port()
  procs = [subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, str(_ROOT / 'launch.py'), *_FLAGS, f'--config.data.cache_dir={cache}', f'--workdir={workdir}',
       '--config.distributed.enabled=True', f'--config.distributed.coordinator_address=localhost:{port}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
      cwd=workdir.parent, env=_env(2, fault), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  out = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      _, err = proc.communicate()
    out.append((proc.returncode, err))
  return out


def _results(workdir) -> dict:
  return json.loads((workdir / 'results.json').read_text())


_ONE_IMAGE = 100 / 8  # Points of one image in the smoke config's 8-image evaluation.


def _check_same(multi: dict, single: dict) -> None:
  """The same training and scores. Float32 sums over the same 4 shards run in another order across processes, so
  the loss curves agree to ~1e-6; a score may differ by one image where two of the random heads' logits nearly tie
  (measured: top-5 once, 37.5 vs 50), in at most one cell of all the matrices."""
  assert multi['stages'] == single['stages']
  for task, curve in single['curves'].items():
    np.testing.assert_allclose(np.asarray(multi['curves'][task]), np.asarray(curve), rtol=1e-4, atol=1e-5,
                               err_msg=task)
  flips = []
  for metric, matrix in single['metrics'].items():
    got, want = np.asarray(multi['metrics'][metric], float), np.asarray(matrix, float)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=metric)
    diff = np.abs(np.nan_to_num(got) - np.nan_to_num(want))
    assert diff.max() <= _ONE_IMAGE + 1e-6, (metric, got, want)
    flips += [(metric, i, j) for i, j in zip(*np.nonzero(diff > 1e-3))]
  assert len(flips) <= 1, flips


def test_two_processes_give_the_one_process_results_and_resume_after_both_are_killed(tmp_path):
  cache = tmp_path / 'tfds'
  single = _one_process(tmp_path / 'one', cache)  # 4 devices in one process; it also builds the TFDS cache.
  assert single.returncode == 0, single.stderr[-3000:]
  workdir = tmp_path / 'two'
  # Both are set to die (SIGKILL) at their 3rd step, the first of stage 2, after stage 1's snapshot; whichever goes
  # first, the other one's runtime sees its peer gone and aborts (SIGABRT) if it is not killed too.
  killed = _two_processes(workdir, cache, fault='step:3')
  codes = sorted(code for code, _ in killed)
  assert codes[0] == -9 and codes[1] in (-9, -6), [err[-2000:] for _, err in killed]
  assert not (workdir / 'results.json').exists()
  resumed = _two_processes(workdir, cache)
  for code, err in resumed:
    assert code == 0, err[-3000:]
  assert 'resuming from checkpoint' in resumed[0][1]
  _check_same(_results(workdir), _results(tmp_path / 'one'))
  # Process 0 wrote the reports and printed the summary; process 1 wrote nothing of its own.
  assert '**Verdict: ' in resumed[0][1] and '**Verdict: ' not in resumed[1][1]
  listing = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith('events.'))  # noqa: E731
  assert listing(workdir) == listing(tmp_path / 'one')
