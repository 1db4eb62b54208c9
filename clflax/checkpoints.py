"""Orbax checkpoints: a snapshot per stage (`checkpoints/stage_<k>`) and periodic in-stage ones for resuming.

Orbax writes into a temporary folder and renames it when complete, so a checkpoint half-written by a killed process
is never listed (and never loaded). Each checkpoint holds the array state (train state, memories, teacher, best
weights) and a JSON `meta` (position in the run, metrics so far, curves) that says where to continue.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STAGE_DIR = 'checkpoints'
PROGRESS_DIR = os.path.join('checkpoints', 'progress')


def _manager(directory: str, *, step_prefix: str | None, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, step_prefix=step_prefix, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'meta'), options=options)


def stage_manager(workdir: str) -> ocp.CheckpointManager:
  """Snapshots after each stage: `workdir/checkpoints/stage_<k>` (k = 1..T), all kept."""
  return _manager(os.path.join(workdir, STAGE_DIR), step_prefix='stage', max_to_keep=None)


def progress_manager(workdir: str) -> ocp.CheckpointManager:
  """In-stage resume points keyed by the run's global step; only the latest two are kept."""
  return _manager(os.path.join(workdir, PROGRESS_DIR), step_prefix=None, max_to_keep=2)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves synchronously (the checkpoint is complete, and renamed into place, when this returns)."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` into the structure (and shardings) of `like`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def latest_meta(manager: ocp.CheckpointManager) -> tuple[int | None, dict | None]:
  """(step, meta) of the newest complete checkpoint of `manager`, or (None, None)."""
  step = manager.latest_step()
  if step is None:
    return None, None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  return step, meta


def fresh_meta() -> dict:
  """Where a run stands; saved as JSON beside the arrays of every checkpoint."""
  return {
      'saves': 0,  # Checkpoints written so far (orders stage snapshots and progress checkpoints).
      'stage': 0,  # Index of the stage in progress (or next).
      'epoch': 0,  # Next epoch of that stage.
      'stage_step': 0,  # Steps done in that stage.
      'best_score': None,  # Best validation score of the stage so far (early stopping).
      'bad_epochs': 0,  # Epochs since it improved.
      'baseline': None,  # Scores of every task before stage 1 (FWT).
      'rows': [],  # Scores of every task after each finished stage.
      'curves': {},  # task -> [[step, loss], ...].
      'epoch_scores': {},  # task -> validation score after each epoch.
      'stage_seconds': [],  # Wall time of each finished stage.
      'stage_seconds_so_far': 0.0,  # Wall time spent in the stage in progress before a resume.
  }


class Progress:
  """The run's resume point: JSON `meta` + the arrays (train state, context, best weights) in Orbax checkpoints."""

  def __init__(self, workdir: str):
    self.stages = stage_manager(workdir)
    self.progress = progress_manager(workdir)
    self.meta = fresh_meta()

  def _newest(self):
    """(manager, step, meta) of the newest complete checkpoint of either kind, or None."""
    candidates = []
    for manager in (self.stages, self.progress):
      step, meta = latest_meta(manager)
      if step is not None:
        candidates.append((meta['saves'], manager, step, meta))
    if not candidates:
      return None
    return max(candidates, key=lambda c: c[0])[1:]

  def resume(self, like: dict) -> tuple[dict, bool]:
    """Restores the newest checkpoint into the structure of `like` ({'state','context','best'}); (tree, resumed)."""
    newest = self._newest()
    if newest is None:
      return like, False
    manager, step, _ = newest
    tree, self.meta = restore(manager, step, like)
    return tree, True

  def save(self, tree: dict, *, stage_done: int | None = None) -> None:
    """Writes a progress checkpoint, or with `stage_done=k` the snapshot `stage_<k+1>` after stage k."""
    self.meta['saves'] += 1
    if stage_done is None:
      save(self.progress, self.meta['saves'], tree, self.meta)
    else:
      save(self.stages, stage_done + 1, tree, self.meta)
