r"""Online EWC: exact per-example Fisher diagonal after each stage, quadratic penalty to the anchors.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/ewc.py --workdir runs/ewc
Full mini sets, default recipe, 2-core CPU: ~27 min (seed-0 scores: README, Vision results).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/ewc.py:smoke --workdir runs/ewc_smoke
"""
from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('ewc',)
  config.strategy.ewc.strength = 1000.  # lambda of the penalty (Fisher of a 3-task vision run is small).
  return config
