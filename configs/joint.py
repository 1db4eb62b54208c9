r"""Multi-task upper bound (not continual): every stage's step also trains the other two heads on batches of their
whole training sets (un-augmented), so all three tasks are learned together and nothing can be forgotten. The
sequential strategies' scores are judged against this one.

Each step costs about three plain steps (one batch per head). Command (bundled sample data, CPU; full mini sets: add
--config.data_dir=../shared/data; the whole 224 px run on CPU takes roughly three times naive's time):
  python launch.py --config configs/joint.py --workdir runs/joint
Smoke preset (tiny model, a few steps; about a minute on CPU):
  python launch.py --config configs/joint.py:smoke --workdir runs/joint_smoke
"""
from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.strategy.names = ('naive',)
  config.train.joint = True
  return config
