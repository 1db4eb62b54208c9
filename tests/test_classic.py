"""The classic Permuted-MNIST protocol through the trainer: a 3-task, few-hundred-example version in seconds."""
import json

import numpy as np
import pytest

from clflax import cli
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
    assert cli.run(config, str(tmp_path / name)) == 0
    scores[name] = _final_and_forgetting(tmp_path / name)
    timing = json.loads((tmp_path / name / 'results.json').read_text())['timing']
    # 3 tasks x one epoch of 500 examples in batches of 10; the training time excludes eval and compiles.
    assert timing['train_steps'] == 3 * 500 // config.train.batch_size == 150
    assert 0 < timing['train_seconds'] < timing['total_seconds']
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
  assert cli.run(config, str(tmp_path)) == 0
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
  from clflax.configs import validation  # pylint: disable=g-import-not-at-top
  config = permuted_mnist.get_config('vanilla')
  config.classic.num_tasks = 6  # As --config.classic.num_tasks=6 does.
  validation.sync_classic_tasks(config)
  assert tuple(config.tasks) == ('task4', 'task5', 'task6')
  assert dict(config.train.epochs) == {'task4': 1, 'task5': 1, 'task6': 1}
  validation.validate(config)
  config.train.epochs.task4 = 2
  config.classic.num_tasks = 5
  with pytest.raises(ValueError, match='epochs differs between tasks'):
    validation.sync_classic_tasks(config)
  config.classic.skip_tasks = 5
  with pytest.raises(ValueError, match='leaves no task'):
    validation.sync_classic_tasks(config)


def test_joint_batches_mix_every_task_with_its_own_permutation():
  import jax  # pylint: disable=g-import-not-at-top
  from clflax.data import classic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  num_tasks, rows = 5, 40
  images = rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8)
  perms = np.stack([rng.permutation(784) for _ in range(num_tasks)]).astype(np.int32)
  index = np.tile(np.arange(rows, dtype=np.int32), (num_tasks, 1))
  labels = np.tile(np.arange(rows, dtype=np.int32) % 10, (num_tasks, 1))
  pool = jax.device_put(classic.Pool(images, perms, np.zeros(num_tasks, np.float32), index, labels, np.uint32(3)))
  batch = jax.jit(lambda s: classic.joint_batch_fn(pool, 2, 0, s, batch_size=200, multi_head=True, first_task=1))(0)
  tasks, x = np.asarray(batch['head']), np.asarray(batch['image'])
  assert set(tasks) == {1, 2, 3, 4}  # Tasks >= first_task only, all of them.
  flat = images.reshape(rows, -1).astype(np.float32) / 255.
  for task, image, label in zip(tasks, x, np.asarray(batch['label'])):
    # Each example is some row seen through ITS task's permutation (brute-force search over rows).
    matches = np.flatnonzero(np.all(np.isclose(flat[:, perms[task]], image), axis=1))
    assert len(matches) >= 1 and labels[task, matches[0]] == label
