r"""Split MNIST: five tasks of two digits each (0/1, 2/3, ..., 8/9), learned in sequence by the classic MLP.

Class-incremental by default (one 10-way head: the hard setting); `multi_head` makes it task-incremental (a 2-way
head per task, the task id known at test time). All 5 tasks are trained (no tuning tasks), one epoch each over
their ~10,000 training images (the smallest task's count, after the 5,000-image validation split), batch 10, plain
SGD with the strategy's Permuted-MNIST learning rate. Same args as permuted_mnist.py (strategy, '+' compositions,
',smoke'), plus ',multi_head'.

Command (the four MNIST idx files in <data_dir>/mnist; 5 tasks of ~10,000 steps each):
  python launch.py --config configs/split_mnist.py:agem --config.data_dir=../shared/data --workdir runs/sm_agem
"""
import ml_collections

from configs import permuted_mnist


def get_config(arg='agem'):
  parts = (arg or 'agem').split(',')
  multi_head = 'multi_head' in parts
  config = permuted_mnist.get_config(','.join(p for p in parts if p != 'multi_head'))
  smoke = 'smoke' in parts
  c = config.classic
  c.protocol = 'split'  # Task t holds digits 2t and 2t + 1.
  c.num_tasks, c.skip_tasks = 5, 0  # Every task is learned (no tuning tasks in this protocol).
  c.classes_per_task = 2  # Digits per task.
  c.multi_head = multi_head  # True: task-incremental (2-way head per task); False: one 10-way head.
  c.examples_per_task = c.test_examples_per_task = 200 if smoke else 0  # 0 = every image of the task's digits.
  config.tasks = tuple(f'task{i + 1}' for i in range(c.num_tasks))
  config.train.epochs = ml_collections.ConfigDict({t: 1 for t in config.tasks})
  config.train.loss_weights = ml_collections.ConfigDict({t: 1.0 for t in config.tasks})
  return config
