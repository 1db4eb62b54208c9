"""Orbax checkpoints: a snapshot per stage (`checkpoints/stage_<k>`) and periodic in-stage ones for resuming.

Orbax writes into a temporary folder (`<name>.orbax-checkpoint-tmp`) and renames it when complete, so a checkpoint
half-written by a killed process is never listed (and never loaded); the next save of that step removes the
leftover. Each checkpoint holds the array state (train state, memories, teacher, best weights) and a JSON `meta`
(position in the run, metrics so far, curves) that says where to continue. A state with NaN/Inf is never saved.

Testing hook (fault injection): `CLFLAX_FAULT='point:n[,point:n...]'` makes the process die the n-th time it
reaches `point` (counted from its start): 'progress_save' / 'stage_save' in the middle of that checkpoint's write
(after Orbax made its temporary folder and wrote an item into it), and, through `clflax.run`, 'step' (after that
train step), 'eval' (on entering that evaluation of a task), 'consolidate' (after consolidating, before the
snapshot) and 'report' (after results.json, before summary.md). It dies by SIGKILL, or raises `SimulatedCrash`
with `CLFLAX_FAULT_ACTION=raise` (in-process tests). Unset, nothing changes.
"""
import collections
import contextlib
import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STAGE_DIR = 'checkpoints'
PROGRESS_DIR = os.path.join('checkpoints', 'progress')
FAULT_ENV = 'CLFLAX_FAULT'
FAULT_ACTION_ENV = 'CLFLAX_FAULT_ACTION'
FAULT_POINTS = ('step', 'eval', 'consolidate', 'report', 'progress_save', 'stage_save')
# Orbax records this event (in the saving thread) each time an item is complete inside the temporary folder.
_ITEM_WRITTEN_EVENT = '/jax/orbax/write/background_item_finalize_secs'


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


class SimulatedCrash(BaseException):
  """The fault hook's crash with CLFLAX_FAULT_ACTION=raise: a BaseException, so no `except Exception` stops it."""


def parse_faults(spec: str) -> dict[str, int]:
  """'point:n[,point:n...]' -> {point: n} (see the module docstring); '' -> {}."""
  plan = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    point, _, count = item.partition(':')
    if point not in FAULT_POINTS or not count.isdigit() or int(count) < 1:
      raise ValueError(f'{FAULT_ENV}={spec!r}: expected point:n with n >= 1 and point one of '
                       f'{", ".join(FAULT_POINTS)}')
    plan[point] = int(count)
  return plan


def fault_trigger(spec: str) -> Callable[[str], bool]:
  """hit(point) -> True exactly when this process reaches `point` for the n-th time of the plan `spec`."""
  plan, seen = parse_faults(spec), collections.Counter()

  def hit(point: str) -> bool:
    seen[point] += 1
    return plan.get(point) == seen[point]

  return hit


def crash(point: str) -> None:
  """Ends the process like a kill (SIGKILL: no cleanup, no flush), or raises SimulatedCrash (see module doc)."""
  if os.environ.get(FAULT_ACTION_ENV) == 'raise':
    raise SimulatedCrash(point)
  os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _crash_mid_write(point: str):
  """Crashes inside the save of this block, once Orbax has written an item into the temporary folder."""

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _ITEM_WRITTEN_EVENT:
      crash(point)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  crash(point)  # Orbax no longer records the event: still never return from an armed save.


class Progress:
  """The run's resume point: JSON `meta` + the arrays (train state, context, best weights) in Orbax checkpoints."""

  def __init__(self, workdir: str):
    self.stages = stage_manager(workdir)
    self.progress = progress_manager(workdir)
    self.meta = fresh_meta()
    self._fault = fault_trigger(os.environ.get(FAULT_ENV, ''))

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
    """Writes a progress checkpoint, or with `stage_done=k` the snapshot `stage_<k+1>` after stage k.

    Raises FloatingPointError (and writes nothing) when the tree holds a NaN or an Inf: the newest checkpoint on
    disk stays the last good one.
    """
    bad = non_finite_paths(tree)
    if bad:
      raise FloatingPointError(
          f'non-finite values in {bad[0]}' + (f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else '')
          + f' at stage {self.meta["stage"] + 1}, step {self.meta["stage_step"]}; not saved, the last good '
          'checkpoint is kept. Lower the learning rate or enable clipping (config.train.clip_norm).')
    point = 'progress_save' if stage_done is None else 'stage_save'
    armed = self._fault(point)
    with _crash_mid_write(point) if armed else contextlib.nullcontext():
      self.meta['saves'] += 1
      if stage_done is None:
        save(self.progress, self.meta['saves'], tree, self.meta)
      else:
        save(self.stages, stage_done + 1, tree, self.meta)
