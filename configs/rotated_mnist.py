r"""Rotated MNIST: the Permuted-MNIST protocol of permuted_mnist.py with each task a fixed rotation instead.

20 rotation angles evenly spaced over [0, 180) degrees (9 apart; the first 3 for tuning), each of the 17 learned
tasks one epoch over 55,000 images with batch 10; the digits are rotated inside the compiled epoch. Same args as
permuted_mnist.py (the strategy, '+' compositions, ',smoke'), same published learning rates (the A-GEM paper tuned
them on permutations; expect a different table).

Command (the four MNIST idx files in <data_dir>/mnist; runtimes about those of permuted_mnist.py plus the in-epoch
rotation: minutes for vanilla on 2 CPU cores, A-GEM several times longer):
  python launch.py --config configs/rotated_mnist.py:agem --config.data_dir=../shared/data
"""
from clflax.configs import mnist


def get_config(arg='agem'):
  return mnist.rotated(arg)
