r"""Memory Aware Synapses: importance from the gradient of the outputs' squared L2 norm, quadratic penalty.

Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/mas.py
Not yet run on the full mini sets (naive takes ~10 min there on a 2-core CPU).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/mas.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('mas',)
  return config
