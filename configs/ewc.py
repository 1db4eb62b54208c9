r"""Online EWC: exact per-example Fisher diagonal after each stage, quadratic penalty to the anchors.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/ewc.py
Full mini sets, default recipe, 2-core CPU: ~13 min (seed-0 scores: docs/results/vision.md).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/ewc.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('ewc',)
  # lambda of the penalty. The exact Fisher of 64 seg examples is small (sum F (theta - theta*)^2 over the det stage's
  # whole drift: 5.5e-5), so 1e3 barely pulls (seg -9.3 mIoU vs naive's -11.0); 1e5: seg -3.1, det +0.3, cls 0.
  config.strategy.ewc.strength = 1e5
  return config
