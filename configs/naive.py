r"""Naive fine-tuning (lower bound): no strategy; later stages overwrite earlier skills.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/naive.py
Full mini sets, default recipe, 2-core CPU: ~10 min (seed-0 scores: docs/results/vision.md).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/naive.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('naive',)
  return config
