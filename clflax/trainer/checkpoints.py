"""Orbax checkpoints: a snapshot per stage (`checkpoints/stage_<k>`) and periodic in-stage ones for resuming.

Orbax writes into a temporary folder (`<name>.orbax-checkpoint-tmp`) and renames it when complete, so a checkpoint
half-written by a killed process is never listed (and never loaded); the next save of that step removes the
leftover. Each checkpoint holds the arrays (`state.TrainTree`: train state, memories, teacher, best weights) and
the JSON `state.Progress` (position in the run, metrics so far, curves) that says where to continue. A state with
NaN/Inf is never saved.

Hooks (`Checkpointer(workdir, hooks)`): each is called with 'progress_save' or 'stage_save' in the middle of that
checkpoint's write (after Orbax made its temporary folder and wrote an item into it); clflax.trainer.hooks uses
this to test that a crash there loses nothing.
"""
import contextlib
import os
from typing import Any, Callable, Optional, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clflax.runtime import files

from clflax.trainer.state import Progress
from clflax.trainer.state import TrainTree

STAGE_DIR = 'checkpoints'
PROGRESS_DIR = os.path.join('checkpoints', 'progress')
# Orbax records this event (in the saving thread) each time an item is complete inside the temporary folder.
_ITEM_WRITTEN_EVENT = '/jax/orbax/write/background_item_finalize_secs'


def _manager(directory: str, *, step_prefix: str | None, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, step_prefix=step_prefix, enable_async_checkpointing=False)
  where = os.path.abspath(directory) if files.is_local(directory) else epath.Path(directory)  # gs://, s3://...
  return ocp.CheckpointManager(where, item_names=('state', 'meta'), options=options)


def stage_manager(workdir: str) -> ocp.CheckpointManager:
  """Snapshots after each stage: `workdir/checkpoints/stage_<k>` (k = 1..T), all kept."""
  return _manager(os.path.join(workdir, STAGE_DIR), step_prefix='stage', max_to_keep=None)


def progress_manager(workdir: str) -> ocp.CheckpointManager:
  """In-stage resume points keyed by the run's global step; only the latest two are kept."""
  return _manager(os.path.join(workdir, PROGRESS_DIR), step_prefix=None, max_to_keep=2)


def _host_copy(x):
  """A replicated array as one host numpy copy: Orbax writes numpy leaves about 2.5x faster than jax.Arrays (no
  per-shard bookkeeping), and restores them into `like`'s shardings all the same. Sharded arrays stay as they are."""
  if not isinstance(x, jax.Array):
    return x
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.sharding.is_fully_replicated:  # Multi-host: every process holds the whole value.
    return np.asarray(x.addressable_data(0))
  return x


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves synchronously (the checkpoint is complete, and renamed into place, when this returns)."""
  state = jax.tree.map(_host_copy, state)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` into the structure (and shardings) of `like`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:  # Written by other code: another tree structure or shapes.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'checkpoint {step} in {manager.directory} does not fit this run ({first}); it was written '
                     'by a different version of the code: use another --workdir, or --fresh') from e
  return restored.state, restored.meta


def latest_meta(manager: ocp.CheckpointManager) -> tuple[int | None, dict | None]:
  """(step, meta) of the newest complete checkpoint of `manager`, or (None, None)."""
  step = manager.latest_step()
  if step is None:
    return None, None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  return step, meta


@jax.jit
def _finite_leaves(leaves: list) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def non_finite_paths(tree: Any) -> list[str]:
  """Key paths of the floating-point leaves of `tree` that hold a NaN or an Inf (one compiled reduction)."""
  flat = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not flat:
    return []
  finite = np.asarray(jax.device_get(_finite_leaves([x for _, x in flat])))
  return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


def _call_during_write(hooks, point: str):
  """A context calling each hook once with `point`, inside the save of the block, once Orbax has written an item
  into the temporary folder (or after the save, should Orbax no longer record that event)."""
  called = []

  def call():
    if not called:
      called.append(True)
      for hook in hooks:
        hook(point)

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _ITEM_WRITTEN_EVENT:
      call()

  @contextlib.contextmanager
  def block():
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      yield
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
    call()

  return block()


class Checkpointer:
  """The run's resume points: `TrainTree` arrays + `Progress` JSON in Orbax checkpoints (stage snapshots and
  in-stage ones); the newest complete one of either kind is where a rerun continues."""

  def __init__(self, workdir: str, hooks: Sequence[Callable[[str], None]] = ()):
    self.stages = stage_manager(workdir)
    self.progress = progress_manager(workdir)
    self._hooks = tuple(hooks)

  def _newest(self):
    """(manager, step) of the newest complete checkpoint of either kind, or None."""
    candidates = []
    for manager in (self.stages, self.progress):
      step, meta = latest_meta(manager)
      if step is not None:
        candidates.append((meta['saves'], manager, step))
    return max(candidates, key=lambda c: c[0])[1:] if candidates else None

  def resume(self, like: TrainTree) -> tuple[TrainTree, Optional[Progress]]:
    """The newest checkpoint restored into the structure of `like`, and its Progress; (like, None) if none."""
    newest = self._newest()
    if newest is None:
      return like, None
    manager, step = newest
    tree, meta = restore(manager, step, like)
    return TrainTree(*tree), Progress.from_json(meta)

  def save(self, tree: TrainTree, progress: Progress, *, stage_done: Optional[int] = None) -> None:
    """Writes a progress checkpoint, or with `stage_done=k` the snapshot `stage_<k+1>` after stage k.

    Raises FloatingPointError (and writes nothing) when the tree holds a NaN or an Inf: the newest checkpoint on
    disk stays the last good one.
    """
    bad = non_finite_paths(tree)
    if bad:
      raise FloatingPointError(
          f'non-finite values in {bad[0]}' + (f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else '')
          + f' at stage {progress.stage + 1}, step {progress.stage_step}; not saved, the last good '
          'checkpoint is kept. Lower the learning rate or enable clipping (config.train.clip_norm).')
    point = 'progress_save' if stage_done is None else 'stage_save'
    with _call_during_write(self._hooks, point) if self._hooks else contextlib.nullcontext():
      progress.saves += 1
      if stage_done is None:
        save(self.progress, progress.saves, tree, progress.to_json())
      else:
        save(self.stages, stage_done + 1, tree, progress.to_json())
