"""Hooks: callables the trainer calls with the name of the point it has reached, e.g. to inject faults.

`train_and_evaluate(config, workdir, hooks=...)` calls every hook with
  'step'          after each train step (each epoch call with on-device epochs),
  'eval'          on entering the evaluation of a task,
  'consolidate'   after a stage's consolidation, before its snapshot,
  'report'        after results.json is written, before summary.md,
  'progress_save' / 'stage_save'   in the middle of that checkpoint's write (clflax.trainer.checkpoints).
A hook that raises or kills the process stops the run there; a hook that returns lets it go on.

`fault_hook(spec)` is the one the command line installs from `CLFLAX_FAULT='point:n[,point:n...]'`: the process
dies (SIGKILL: no cleanup, no flush) the n-th time it reaches `point`, or raises `SimulatedCrash` with
`CLFLAX_FAULT_ACTION=raise` (in-process tests). The tests use it to show that a resumed run loses nothing.
"""
import collections
import os
import signal
from typing import Callable

FAULT_ENV = 'CLFLAX_FAULT'
FAULT_ACTION_ENV = 'CLFLAX_FAULT_ACTION'
POINTS = ('step', 'eval', 'consolidate', 'report', 'progress_save', 'stage_save')


class SimulatedCrash(BaseException):
  """The fault hook's crash with CLFLAX_FAULT_ACTION=raise: a BaseException, so no `except Exception` stops it."""


def parse_faults(spec: str) -> dict[str, int]:
  """'point:n[,point:n...]' -> {point: n}; '' -> {}. ValueError in one line for a malformed spec."""
  plan = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    point, _, count = item.partition(':')
    if point not in POINTS or not count.isdigit() or int(count) < 1:
      raise ValueError(f'{FAULT_ENV}={spec!r}: expected point:n with n >= 1 and point one of {", ".join(POINTS)}')
    plan[point] = int(count)
  return plan


def crash(point: str) -> None:
  """Ends the process like a kill, or raises SimulatedCrash (see the module doc)."""
  if os.environ.get(FAULT_ACTION_ENV) == 'raise':
    raise SimulatedCrash(point)
  os.kill(os.getpid(), signal.SIGKILL)


def fault_hook(spec: str) -> Callable[[str], None]:
  """A hook that crashes exactly when this process reaches a point of `spec` for the n-th time."""
  plan, seen = parse_faults(spec), collections.Counter()

  def hook(point: str) -> None:
    seen[point] += 1
    if plan.get(point) == seen[point]:
      crash(point)

  return hook


def from_environment() -> tuple:
  """The hooks `CLFLAX_FAULT` asks for (none when it is unset)."""
  spec = os.environ.get(FAULT_ENV, '')
  return (fault_hook(spec),) if spec else ()
