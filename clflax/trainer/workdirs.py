"""Workdir safety: a workdir belongs to one config; a different config never resumes or overwrites it."""
import contextlib
import fcntl
import json
import os

from absl import logging
import ml_collections

from clflax.runtime import files

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Config fields added after runs were already being recorded, with the value that reproduces the behaviour from before
# the field existed: a saved config without the field resumes when the field has this value (and only then).
ADDED_FIELDS = {
    'train.backbone_lr_scale': 1.0,  # One learning rate for the whole network.
    'train.flatten_optimizer': False,  # The optimizer on the parameter tree as it is.
    'strategy.si.max_stiffness': 0.0,  # SI's penalty uncapped.
    'train.joint': False,  # Continual stages.
    'model.frozen_bn': False,  # Batch norm in training mode.
    'model.det_image_head': False,  # Image-level scores from the heatmap.
    'train.image_label_weight': 1.0,  # (Read only with the image-level branch.)
    'model.cls_head_init': 'random',  # A fresh classification head.
    'model.shared_neck': True,  # One FPN neck for seg and det.
    'train.balance_memory_per_task': 64,  # (Was strategy.replay.memory_per_task, 64 by default.)
    'model.dtype': 'float32',  # Everything computed in float32.
}
# Fields that change how fast or where a run executes, never what it computes: a resume may change them, and the
# processes of one multi-process run differ in them (process ids, a fresh coordinator port).
RUNTIME_FIELDS = ('data.read_threads', 'data.prefetch', 'distributed.enabled', 'distributed.coordinator_address',
                  'distributed.num_processes', 'distributed.process_id')


def flatten(config: ml_collections.ConfigDict | dict) -> dict:
  """Dotted-key view of a config, JSON-normalised (tuples become lists) so saved and live configs compare."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  flat = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for key, value in node.items():
        visit(f'{prefix}.{key}' if prefix else str(key), value)
    else:
      flat[prefix] = node

  visit('', json.loads(json.dumps(tree)))
  return flat


def complete(saved: dict, current: dict) -> dict:
  """A saved (flattened) config completed with the fields of `current` added since it was written, at the values
  that reproduce the behaviour from before they existed (`ADDED_FIELDS`)."""
  return {**{k: v for k, v in ADDED_FIELDS.items() if k not in saved and k in current}, **saved}


def config_diff(saved: dict, current: dict) -> list[str]:
  """Lines 'key: saved -> current' for every key whose value differs (or exists on one side only).

  A key in ADDED_FIELDS that the saved config lacks counts as saved with its behaviour-preserving value; the
  settings of a strategy active in neither config (`strategy.<name>.*`, e.g. a section added by newer code) and the
  RUNTIME_FIELDS do not count: they change nothing the run computes.
  """
  missing = object()
  saved, lines = complete(saved, current), []
  active = set(saved.get('strategy.names') or ()) | set(current.get('strategy.names') or ())
  for key in sorted(set(saved) | set(current)):
    parts = key.split('.')
    if (len(parts) > 2 and parts[0] == 'strategy' and parts[1] not in active) or key in RUNTIME_FIELDS:
      continue
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      show = lambda v: '(absent)' if v is missing else repr(v)  # noqa: E731
      lines.append(f'{key}: {show(old)} -> {show(new)}')
  return lines


def prepare(workdir: str, config: ml_collections.ConfigDict, fresh: bool = False, write: bool = True) -> str:
  """Returns the workdir to use, recording the config there; refuses a workdir that holds a different run.

  With `fresh=True` a conflicting workdir is left untouched and the run starts in the first free `run_<n>` subfolder.
  `write=False` (every process but 0 of a multi-process run) decides the same way and writes nothing: a folder
  holds either nothing yet or process 0's copy of this same config, and both lead to the same choice.
  """
  current = flatten(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if files.exists(path):
    try:
      saved = flatten(json.loads(files.read_text(path)))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f'{path} is unreadable ({e}); use another --workdir') from e
    differences = config_diff(saved, current)
    if differences:
      if not fresh:
        raise ValueError(
            f'workdir {workdir} holds a run with a different config ({"; ".join(differences)}); '
            'use another --workdir, or --fresh to start in a new subfolder')
      index = 1
      while True:  # The first run_<n> that holds this same config (resume it) or nothing yet (start it).
        candidate = os.path.join(workdir, f'run_{index}')
        try:
          return prepare(candidate, config, write=write)
        except ValueError:
          index += 1
    return workdir
  if not write:
    return workdir
  files.write_text_atomically(path, json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
  return workdir


@contextlib.contextmanager
def lock(workdir: str, holder: bool = True):
  """Holds an exclusive lock on `workdir` for the block: a second run of the same workdir fails in one line.

  An OS file lock (flock): the kernel drops it when its process dies, even by SIGKILL, so a crashed run never
  leaves a stale lock behind. In a multi-process run only process 0 (`holder`) takes it; the others belong to the
  same run. A workdir on an object store (gs://...) gets no lock, and a warning says so.
  """
  if not holder:
    yield
    return
  if not files.is_local(workdir):  # Object stores (gs://, s3://) have no lock a crashed run would release.
    logging.warning('workdir %s is not on a local filesystem: no lock keeps a second run out of it; start one run '
                    'per workdir', workdir)
    yield
    return
  f = open(os.path.join(workdir, LOCK_FILE), 'a+')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise ValueError(f'workdir {workdir} is in use by another running process; wait for it, or use another '
                       '--workdir') from e
    yield
  finally:
    f.close()  # Closing releases the lock.
