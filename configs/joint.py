r"""Multi-task upper bound (not continual): every stage's step also trains the other two heads on batches of their
whole training sets (un-augmented), so all three tasks are learned together and nothing can be forgotten. The
sequential strategies' scores are judged against this one.

Each step runs all three heads (one batch each), so a stage costs about three naive stages.
Command (bundled sample data, CPU; full mini sets: add --config.data_dir=../shared/data):
  python launch.py --config configs/joint.py
Not yet run on the full mini sets (naive takes ~10 min there on a 2-core CPU; expect ~3x).
Smoke preset (tiny model, a few steps; ~2 min on 2 busy CPU cores):
  python launch.py --config configs/joint.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('naive',)
  config.train.joint = True
  return config
