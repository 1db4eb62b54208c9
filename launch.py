r"""Runs a clflax experiment: `python launch.py --config configs/agem.py --workdir runs/agem`.

Flags: --config configs/x.py[:arg] (ml_collections config file; override any field with --config.a.b=value),
--workdir (results, checkpoints and TensorBoard events; rerunning the same command resumes), --fresh (start over in
a new subfolder when the workdir holds a different run), --debug (show Python tracebacks for user errors).
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from clflax import hugepages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/agem.py[:smoke].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, results and logs.')
_FRESH = flags.DEFINE_bool('fresh', False, 'If the workdir holds a different run, start in a new subfolder.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks instead of one-line errors.')


def _parse_flags(argv):
  """absl parsing, with config override mistakes reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    if '--debug' in argv:
      raise
    first, _, hint = str(e).replace('\\n', '\n').strip('"\'').partition('\n')  # "'key'\nDid you mean ...?"
    missing = first.strip('"\'\\')
    for arg in argv[1:]:  # Name the override that holds the unknown key.
      key = arg.split('=', 1)[0]
      if key.startswith('--config.') and (key.endswith(f'.{missing}') or f'.{missing}.' in key):
        hint = hint.strip('"\'\\ ').replace('"', "'")
        _fail(f'error: unknown config key {key[len("--config."):]!r} (from {arg}); '
                 + (hint if hint else 'see the config file for the valid fields'))
    _fail(f'error: bad flag: {_last_line(e)}')


def _fail(message: str) -> None:
  """User errors exit with status 2, as clflax.run's."""
  print(message, file=sys.stderr)
  sys.exit(2)


def _last_line(error: BaseException) -> str:
  """The informative line of a config_flags error (they embed the config file's traceback as text)."""
  text = f'{error}\n{error.__cause__ or ""}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('both --config and --workdir are required')
  try:
    config = _CONFIG.value
    config.get('seed')  # config_flags loads lazily: surface a missing or broken file here.
  except OSError as e:
    if _DEBUG.value:
      raise
    _fail(f'error: cannot load --config: {_last_line(e)}')
  from clflax import run  # Deferred: JAX starts only after the flags are valid.
  sys.exit(run.main(config, _WORKDIR.value, fresh=_FRESH.value, debug=_DEBUG.value))


if __name__ == '__main__':
  hugepages.ensure()  # Restarts this command once with huge pages for XLA:CPU's buffers (clflax/hugepages.py).
  app.run(main, flags_parser=_parse_flags)
