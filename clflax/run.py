"""The command-line entry behind launch.py: validate, pick the workdir, train; user errors in one line.

Exit codes: 0 done, 2 user error (config, data, weights, workdir), 3 non-finite loss/gradient/state (the NaN
guard; the last good checkpoint is kept), 130 interrupted (Ctrl-C). Rerunning the same command resumes.
"""
import contextlib
import functools
import logging
import os
import sys

import jax
import ml_collections

from clflax import checkpoints
from clflax import configuration
from clflax import hugepages
from clflax import workdirs

# Errors caused by the user's config, data, files or machine (OSError: missing, unreadable, full disk...): shown
# as one line unless --debug.
USER_ERRORS = (ValueError, OSError)


class _QuietLibraries(logging.Filter):
  """Keeps orbax's per-checkpoint INFO chatter out of the console (warnings still show)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def one_line(error: BaseException) -> str:
  """The error's message on one line (some libraries put newlines in theirs)."""
  text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
  return text or type(error).__name__


def _wrap(module, name: str, hit, point: str, *, before: bool, returned: bool = False):
  """Replaces `module.name` by a wrapper that crashes at the n-th call (before it runs, or after it returns)."""
  original = getattr(module, name)

  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    if before and hit(point):
      checkpoints.crash(point)
    out = original(*args, **kwargs)
    if returned:  # `out` is itself a function (a jitted step): crash after its n-th call instead.
      return _crash_after_call(out, hit, point)
    if not before and hit(point):
      checkpoints.crash(point)
    return out

  setattr(module, name, wrapper)
  return lambda: setattr(module, name, original)


def _crash_after_call(fn, hit, point):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    out = fn(*args, **kwargs)
    if hit(point):
      checkpoints.crash(point)
    return out

  return wrapper


@contextlib.contextmanager
def fault_hooks(spec: str):
  """Testing hook (`CLFLAX_FAULT`, see clflax.checkpoints): arms the 'step', 'eval', 'consolidate' and 'report'
  crash points for this block by wrapping the trainer's collaborators; the save points are armed by Progress."""
  hit = checkpoints.fault_trigger(spec)  # Validates the spec.
  points = set(checkpoints.parse_faults(spec)) - {'progress_save', 'stage_save'}
  if not points:
    yield
    return
  from clflax import consolidate, evaluation, report, steps  # pylint: disable=g-import-not-at-top
  undo = [
      _wrap(steps, 'jit_train_step', hit, 'step', before=False, returned=True),
      _wrap(evaluation, 'evaluate_task', hit, 'eval', before=True),
      _wrap(consolidate, 'consolidate', hit, 'consolidate', before=False),
      _wrap(report, 'write_summary', hit, 'report', before=True),
  ]
  try:
    yield
  finally:
    for restore in reversed(undo):
      restore()


def _setup_compilation(config: ml_collections.ConfigDict) -> None:
  """Persistent compile cache: CLFLAX_COMPILATION_CACHE ('' disables it), else the cache the embedding process set
  (tests), else ~/.cache/clflax/xla. Compiled steps are then reused across runs and resumes."""
  cache = os.environ.get('CLFLAX_COMPILATION_CACHE')
  if cache is None and not jax.config.jax_compilation_cache_dir:
    cache = os.path.expanduser('~/.cache/clflax/xla')
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if config.get('fast_compile'):
    jax.config.update('jax_disable_most_optimizations', True)


def main(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False, debug: bool = False) -> int:
  """Runs `config` in `workdir`; returns the process exit code."""
  logging.getLogger('absl').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # No 'libtpu not found' noise on CPU.
  _setup_compilation(config)
  logging.info('%s', hugepages.status())
  try:
    with fault_hooks(os.environ.get(checkpoints.FAULT_ENV, '')):
      configuration.maybe_initialize_distributed(config)
      configuration.sync_classic_tasks(config)
      configuration.validate(config, num_devices=jax.device_count())
      configuration.check_pretrained(config)
      workdir = workdirs.prepare(workdir, config, fresh=fresh)
      with workdirs.lock(workdir):
        from clflax import train  # pylint: disable=g-import-not-at-top  (heavy; only for a valid config)
        train.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # The NaN guard: the last good checkpoint stays intact.
    if debug:
      raise
    print(f'error: {one_line(e)}', file=sys.stderr)
    return 3
  except USER_ERRORS as e:
    if debug:
      raise
    print(f'error: {one_line(e)}  (rerun with --debug for a traceback)', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if debug:
      raise
    print('interrupted: rerun the same command to resume from the last checkpoint', file=sys.stderr)
    return 130
  return 0
