r"""GEM: each earlier task's memory gradient constrains the update (no task's memory loss may increase, to first order).

One gradient per earlier task through its own head every step (costlier than A-GEM's single reference gradient).
Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/gem.py
Not yet run on the full mini sets (naive takes ~10 min there on a 2-core CPU).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/gem.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('gem',)
  if arg == 'smoke':
    config.strategy.gem.memory_per_task = 8  # As the smoke preset's other memories.
    config.strategy.gem.ref_batch_per_task = 4  # Per earlier task, every step.
  return config
