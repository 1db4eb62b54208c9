"""The command-line entry behind launch.py: validate, pick the workdir, train; user errors in one line."""
import logging
import os
import sys

import jax
import ml_collections

from clflax import configuration
from clflax import workdirs

# Errors caused by the user's config, data or files: shown as one line unless --debug.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class _QuietLibraries(logging.Filter):
  """Keeps orbax's per-checkpoint INFO chatter out of the console (warnings still show)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False, debug: bool = False) -> int:
  """Runs `config` in `workdir`; returns the process exit code."""
  logging.getLogger('absl').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    handler.addFilter(_QuietLibraries())
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # No 'libtpu not found' noise on CPU.
  # Compiled steps are cached across runs and resumes (set CLFLAX_COMPILATION_CACHE='' to disable).
  cache = os.environ.get('CLFLAX_COMPILATION_CACHE', os.path.expanduser('~/.cache/clflax/xla'))
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if config.get('fast_compile'):
    jax.config.update('jax_disable_most_optimizations', True)
  try:
    configuration.maybe_initialize_distributed(config)
    configuration.validate(config, num_devices=jax.device_count())
    workdir = workdirs.prepare(workdir, config, fresh=fresh)
    from clflax import train  # Heavy imports only once the config is known to be valid.
    train.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # The NaN guard: the last good checkpoint stays intact.
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 3
  except USER_ERRORS as e:
    if debug:
      raise
    print(f'error: {e}  (rerun with --debug for a traceback)', file=sys.stderr)
    return 2
  return 0
