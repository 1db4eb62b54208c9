"""Experience replay (ER): earlier tasks' memory batches trained on beside the incoming one.

Each step adds `weight` x the loss of `batch` examples of each earlier task's episodic memory, through that task's
own head (with one shared memory: `batch` examples drawn across all tasks stored so far). The buffers themselves
are in strategies/memory.py and are re-exported here: `replay.init / add / append / sample` (reservoir sampling and
end-of-task memories, for any example structure), `init_balanced / add_balanced` (one reservoir per class).
"""
import ml_collections

from clflax.strategies import base
# The buffers' public home since the first release: `replay.init`, `replay.add`, `replay.sample`, ...
from clflax.strategies.memory import (  # noqa: F401  pylint: disable=unused-import
    SHARED, BalancedBuffer, Buffer, ReplayBuffer, add, add_balanced, append, available, init, init_balanced,
    memory_loss, sample, sample_loss, size, task_blocks, valid_slots)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory_per_task = 64  # Examples kept of each finished task.
  c.batch = 8  # Memory examples replayed per step (per old task).
  c.weight = 1.0  # Weight of the replayed loss relative to the task loss.
  return c


def _loss_terms(cfg, ctx, params, key):
  """Experience replay: the loss of memory batches of the earlier tasks, through their own heads."""
  if not available(ctx):
    return {}
  return {'replay': cfg.weight * memory_loss(ctx, params, key, cfg.batch)}


STRATEGY = base.Strategy(
    name='replay', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'replay', cfg, {'memory_per_task': {'positive': True, 'integer': True},
                        'batch': {'positive': True, 'integer': True}, 'weight': {}}),
    needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task), loss_terms=_loss_terms)
