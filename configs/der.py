r"""DER++: replay of earlier tasks' memories matching the outputs stored at the end of their stage, plus their labels.

The memory keeps each task's examples with the model's outputs on them (all of a head's outputs: detection's
heatmap, sizes and offsets too); beta=0 is plain DER.
Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/der.py
Not yet run on the full mini sets (naive takes ~10 min there on a 2-core CPU).
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/der.py:smoke
Plain DER: add --config.strategy.der.beta=0.
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('der',)
  config.strategy.der.alpha = 0.3  # Output-matching weight (the DER authors' values range 0.1-1.0).
  config.strategy.der.beta = 0.5  # Label term: DER++.
  if arg == 'smoke':
    config.strategy.der.memory_per_task = 8  # As the smoke preset's other memories.
    config.strategy.der.batch = 4
  return config
