"""The installed package, as a user of another project meets it: importable from any directory with its bundled
data, and its console entry running a repository config given as a path and a config file of the user's own.

These tests need clflax installed as a wheel in the interpreter running them (`.ci/run` does
`pip install .`); they skip, saying so, from a checkout that is only on the path.
"""
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# A few steps of one head: what is tested is that the entry loads and runs the configs, not the training.
_TINY = ('--config.tasks=("cls",)', '--config.train.epochs.cls=1', '--config.train.steps_per_epoch=2')


def _installed():
  try:
    dist = importlib.metadata.distribution('clflax')
  except importlib.metadata.PackageNotFoundError:
    pytest.skip('clflax is not installed in this interpreter (pip install . runs these tests)')
  if dist.read_text('direct_url.json') and json.loads(dist.read_text('direct_url.json')).get(
      'dir_info', {}).get('editable'):
    pytest.skip('clflax is installed in editable mode; these tests check the wheel')
  return dist


def _outside_env():
  """The environment of a process started outside the checkout: nothing of the repository on its path."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return dict(env, JAX_PLATFORMS='cpu')


def test_the_wheel_imports_from_any_directory_with_its_sample_data(tmp_path):
  dist = _installed()
  code = textwrap.dedent('''
      import json, pathlib, clflax
      from clflax.strategies import agem, ewc, gem, der, tagem, packnet, mer
      from clflax.configs import default
      from clflax.data import sources
      sample = pathlib.Path(sources.default_data_dir())
      print(json.dumps({'file': clflax.__file__, 'version': clflax.__version__,
                        'sample': sorted(p.name for p in sample.iterdir()),
                        'strategy': default.get_config().strategy.names}))
  ''')
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=_outside_env(), capture_output=True,
                       text=True, timeout=300, check=True)
  found = json.loads(out.stdout.strip().splitlines()[-1])
  assert not found['file'].startswith(str(_ROOT / 'clflax')), found['file']  # The installed copy, not the checkout.
  assert 'site-packages' in found['file']
  assert found['version'] == dist.version
  assert {'mini_voc_seg', 'mini_coco_det', 'imagenette_160', 'mnist'} <= set(found['sample'])


def test_the_console_entry_runs_a_repository_config_and_a_users_own(tmp_path):
  _installed()
  entry = shutil.which('clflax', path=os.path.dirname(sys.executable))
  assert entry, 'the console entry point `clflax` is not installed beside the interpreter'
  # docs/design.md's worked example: a strategy in the user's own module beside their experiment file.
  shutil.copy(_ROOT / 'tests' / 'user_strategy.py', tmp_path / 'my_strategies.py')
  (tmp_path / 'my_experiment.py').write_text(textwrap.dedent('''
      """A user's experiment file outside the clflax repository, building on clflax's defaults."""
      from clflax.configs import default
      import my_strategies


      def get_config(arg=None):
        config = default.get_config('smoke')
        config.strategy.names = ('ewc', 'my_strategies:L2_INIT')
        config.strategy.l2init = my_strategies.L2_INIT.config()
        return config
  '''))
  for config in (f'{_ROOT / "configs" / "agem.py"}:smoke', 'my_experiment.py'):
    out = subprocess.run([entry, f'--config={config}', *_TINY], cwd=tmp_path, env=_outside_env(),
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
  for workdir, strategy in (('agem_smoke', ['agem']), ('my_experiment', ['ewc', 'my_strategies:L2_INIT'])):
    results = json.loads((tmp_path / 'runs' / workdir / 'results.json').read_text())
    assert results['stages'] == ['cls'] and results['config']['strategy.names'] == strategy
