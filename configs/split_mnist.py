r"""Split MNIST: five tasks of two digits each (0/1, 2/3, ..., 8/9), learned in sequence by the classic MLP.

Class-incremental by default (one 10-way head: the hard setting); `multi_head` makes it task-incremental (a 2-way
head per task, the task id known at test time). All 5 tasks are trained (no tuning tasks), one epoch each over
their ~10,000 training images (the smallest task's count, after the 5,000-image validation split), batch 10, plain
SGD with the strategy's Permuted-MNIST learning rate. Same args as permuted_mnist.py (strategy, '+' compositions,
',smoke'), plus ',multi_head'.

Command (the four MNIST idx files in <data_dir>/mnist; 5 tasks of ~10,000 steps each):
  python launch.py --config configs/split_mnist.py:agem --config.data_dir=../shared/data
"""
from clflax.configs import mnist


def get_config(arg='agem'):
  return mnist.split(arg)
