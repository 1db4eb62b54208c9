r"""A-GEM: the gradient is projected so that the loss on earlier tasks' episodic memories does not increase.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/agem.py
Full mini sets, default recipe, 2-core CPU: ~22 min (seed-0 scores: docs/results/vision.md).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/agem.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('agem',)
  return config
