"""Workdir safety: a workdir holding a different config is never resumed or overwritten."""
import json
import os

import ml_collections
import pytest

from clflax.trainer import workdirs


def _config(lr=1e-3, names=('agem',)):
  config = ml_collections.ConfigDict()
  config.train = ml_collections.ConfigDict(dict(learning_rate=lr, epochs=dict(seg=2)))
  config.strategy = ml_collections.ConfigDict(dict(names=names))
  return config


def test_same_config_resumes_in_place(tmp_path):
  first = workdirs.prepare(str(tmp_path), _config())
  second = workdirs.prepare(str(tmp_path), _config())
  assert first == second == str(tmp_path)
  with open(tmp_path / workdirs.CONFIG_FILE) as f:
    assert json.load(f)['strategy']['names'] == ['agem']


def test_different_config_is_refused_with_the_differing_keys(tmp_path):
  workdirs.prepare(str(tmp_path), _config())
  saved = (tmp_path / workdirs.CONFIG_FILE).read_text()
  with pytest.raises(ValueError) as info:
    workdirs.prepare(str(tmp_path), _config(lr=0.1, names=('ewc',)))
  message = str(info.value)
  assert 'train.learning_rate: 0.001 -> 0.1' in message
  assert "strategy.names: ['agem'] -> ['ewc']" in message
  assert 'train.epochs.seg' not in message  # Equal keys are not listed.
  assert (tmp_path / workdirs.CONFIG_FILE).read_text() == saved  # Nothing overwritten.


def test_fresh_starts_in_a_new_subfolder(tmp_path):
  workdirs.prepare(str(tmp_path), _config())
  new = workdirs.prepare(str(tmp_path), _config(lr=0.1), fresh=True)
  assert new == os.path.join(str(tmp_path), 'run_1')
  newer = workdirs.prepare(str(tmp_path), _config(lr=0.2), fresh=True)
  assert newer == os.path.join(str(tmp_path), 'run_2')
  # The same changed config again resumes its own subfolder instead of making a third.
  assert workdirs.prepare(str(tmp_path), _config(lr=0.1), fresh=True) == new


def test_a_workdir_in_use_is_refused_and_released_after(tmp_path):
  with workdirs.lock(str(tmp_path)):
    with pytest.raises(ValueError, match='in use by another running process'):
      with workdirs.lock(str(tmp_path)):
        pass
  with workdirs.lock(str(tmp_path)):  # Released when the first holder left.
    pass


def test_a_field_added_by_newer_code_resumes_only_at_its_old_behaviour(tmp_path):
  workdirs.prepare(str(tmp_path), _config())  # Recorded before train.backbone_lr_scale existed.
  config = _config()
  config.train.backbone_lr_scale = 1.0  # The value that means "as before": the same run.
  assert workdirs.prepare(str(tmp_path), config) == str(tmp_path)
  config.train.backbone_lr_scale = 0.1  # A real change of behaviour: refused.
  with pytest.raises(ValueError, match=r'train.backbone_lr_scale: 1.0 -> 0.1'):
    workdirs.prepare(str(tmp_path), config)
  config = _config()
  config.train.some_new_knob = 1.0  # Not a known added field: still a difference.
  with pytest.raises(ValueError, match=r'train.some_new_knob: \(absent\) -> 1.0'):
    workdirs.prepare(str(tmp_path), config)


def test_settings_of_inactive_strategies_do_not_count(tmp_path):
  workdirs.prepare(str(tmp_path), _config())  # names ('agem',).
  config = _config()
  config.strategy.tagem = ml_collections.ConfigDict(dict(pools=10))  # A section newer code added; tagem is off.
  assert workdirs.prepare(str(tmp_path), config) == str(tmp_path)
  config.strategy.names = ('agem', 'tagem')  # Now it is on: a different run.
  with pytest.raises(ValueError, match='strategy.names'):
    workdirs.prepare(str(tmp_path), config)


def test_runtime_fields_do_not_count_and_other_processes_write_nothing(tmp_path):
  config = _config()
  config.distributed = ml_collections.ConfigDict(dict(enabled=True, coordinator_address='host0:1234',
                                                      num_processes=2, process_id=0))
  config.data = ml_collections.ConfigDict(dict(read_threads=4, prefetch=8))
  other = workdirs.prepare(str(tmp_path / 'new'), config, write=False)  # Process 1, before process 0 wrote.
  assert other == str(tmp_path / 'new') and not (tmp_path / 'new').exists()
  workdirs.prepare(str(tmp_path / 'new'), config)  # Process 0.
  # Process 1 (another id), and a resume on a fresh coordinator port with other reader settings: the same run.
  config.distributed.process_id, config.distributed.coordinator_address = 1, 'host0:999'
  config.data.read_threads = 0
  assert workdirs.prepare(str(tmp_path / 'new'), config, write=False) == str(tmp_path / 'new')
  config.train.learning_rate = 0.5  # ...but not another computation.
  with pytest.raises(ValueError, match='train.learning_rate'):
    workdirs.prepare(str(tmp_path / 'new'), config, write=False)


def test_a_workdir_on_an_object_store_is_prepared_through_epath_and_warned_of_no_lock(tmp_path, monkeypatch,
                                                                                     caplog):
  # gs:// needs a bucket: the remote branches run on a local folder that files.is_local() calls remote.
  from clflax.runtime import files  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(files, 'is_local', lambda path: False)
  workdir = str(tmp_path / 'bucket' / 'run')
  assert workdirs.prepare(workdir, _config()) == workdir
  assert json.loads((tmp_path / 'bucket' / 'run' / workdirs.CONFIG_FILE).read_text())['strategy']['names'] == ['agem']
  assert sorted(os.listdir(workdir)) == [workdirs.CONFIG_FILE]  # The temporary object was renamed into place.
  with pytest.raises(ValueError, match='train.learning_rate'):
    workdirs.prepare(workdir, _config(lr=0.5))
  with caplog.at_level('WARNING'):
    with workdirs.lock(workdir):
      with workdirs.lock(workdir):  # No OS lock there: said once per holder, not refused.
        pass
  assert sum('no lock keeps a second run out' in r.getMessage() for r in caplog.records) == 2
  assert not os.path.exists(os.path.join(workdir, workdirs.LOCK_FILE))
