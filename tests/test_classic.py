"""The classic Permuted-MNIST protocol through the trainer: a 3-task, few-hundred-example version in seconds."""
import json

import numpy as np
import pytest

from clflax import run
from configs import permuted_mnist
from configs import rotated_mnist
from configs import split_mnist


def _final_and_forgetting(workdir):
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  matrix = np.asarray(results['metrics']['acc'])
  final = matrix[-1].mean()
  forgetting = np.mean([matrix[:-1, j].max() - matrix[-1, j] for j in range(matrix.shape[1] - 1)])
  return final, forgetting, matrix


def test_agem_forgets_less_than_vanilla(shared_data, tmp_path):
  scores = {}
  for name in ('vanilla', 'agem'):
    config = permuted_mnist.get_config(f'{name},smoke')
    config.data_dir = str(shared_data)
    assert run.main(config, str(tmp_path / name)) == 0
    scores[name] = _final_and_forgetting(tmp_path / name)
  (van_acc, van_forgetting, van_matrix), (agem_acc, agem_forgetting, _) = scores['vanilla'], scores['agem']
  assert van_matrix.shape == (3, 3)
  assert van_matrix[0, 0] > 70  # Each task is learnable in one epoch of 500 examples.
  assert agem_forgetting < van_forgetting, (agem_forgetting, van_forgetting)
  assert agem_acc > van_acc


def test_unknown_strategy_is_refused():
  with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
    permuted_mnist.get_config('agem+bogus')


@pytest.mark.parametrize('multi_head', [False, True], ids=['class_incremental', 'task_incremental'])
def test_split_mnist_learns_each_pair_and_class_incremental_forgets(shared_data, tmp_path, multi_head):
  config = split_mnist.get_config('vanilla,smoke' + (',multi_head' if multi_head else ''))
  config.data_dir = str(shared_data)
  assert run.main(config, str(tmp_path)) == 0
  _, forgetting, matrix = _final_and_forgetting(tmp_path)
  assert matrix.shape == (5, 5)
  assert np.diag(matrix).min() > 85  # Telling two digits apart is easy after one epoch of 200 images...
  if multi_head:
    assert forgetting < 30  # ...and with the task's own 2-way head it mostly stays so;
  else:
    assert forgetting > 50  # with one 10-way head, fine-tuning on the new pair erases the old ones (known result).


def test_rotated_mnist_rotates_each_task_by_its_own_angle():
  config = rotated_mnist.get_config('agem')
  assert config.classic.protocol == 'rotated' and len(config.tasks) == 17
  assert permuted_mnist.get_config('agem').strategy.names == config.strategy.names


def test_command_line_task_count_resizes_the_task_list():
  from clflax import configuration  # pylint: disable=g-import-not-at-top
  config = permuted_mnist.get_config('vanilla')
  config.classic.num_tasks = 6  # As --config.classic.num_tasks=6 does.
  configuration.sync_classic_tasks(config)
  assert tuple(config.tasks) == ('task4', 'task5', 'task6')
  assert dict(config.train.epochs) == {'task4': 1, 'task5': 1, 'task6': 1}
  configuration.validate(config)
  config.train.epochs.task4 = 2
  config.classic.num_tasks = 5
  with pytest.raises(ValueError, match='epochs differs between tasks'):
    configuration.sync_classic_tasks(config)
  config.classic.skip_tasks = 5
  with pytest.raises(ValueError, match='leaves no task'):
    configuration.sync_classic_tasks(config)
