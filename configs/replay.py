r"""Experience replay: each step adds a memory batch of every earlier task to the loss, through its own head.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/replay.py
Full mini sets, default recipe, 2-core CPU: 37 min, measured before the model and huge-page speedups (not re-run
since; naive went 26 -> 10 min). Seed-0 scores: docs/results/vision.md.
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/replay.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('replay',)
  return config
