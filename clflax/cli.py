r"""The command line: `clflax --config configs/agem.py` (or `python launch.py ...`, `python -m clflax ...`).

Flags: --config FILE[:arg] (an ml_collections config file; override any field with --config.a.b=value),
--workdir (results, checkpoints and TensorBoard events; default runs/<config name>[_<arg>] in the current folder;
rerunning the same command resumes), --fresh (start over in a new subfolder when the workdir holds a different
run), --debug (Python tracebacks for user errors), --verbosity=1 (the libraries' own log lines as well).

Exit codes: 0 done, 2 user error (config, data, weights, workdir: one line naming the problem), 3 non-finite
loss/gradient/state (the NaN guard; the last good checkpoint is kept), 130 interrupted. The console gets one line
per event: the run, each dataset, each compiled program, progress with ETAs, validation, the stage-wise table and
where the reports are.
"""
import logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from clflax.runtime import hugepages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/agem.py[:smoke].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, results and logs '
                               '(default: runs/<config name>[_<arg>]).')
_FRESH = flags.DEFINE_bool('fresh', False, 'If the workdir holds a different run, start in a new subfolder.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks instead of one-line errors.')
# Errors caused by the user's config, data, files or machine (OSError: missing, unreadable, full disk...).
USER_ERRORS = (ValueError, OSError)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def default_workdir(config_arg: str) -> str:
  """runs/<file stem>[_<arg>] for `--config path/name.py[:arg]` (characters other than letters, digits, '.', '-'
  and '_' in the arg become '_')."""
  path, _, arg = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += '_' + re.sub(r'[^\w.-]+', '_', arg).strip('_')
  return os.path.join('runs', name)


def one_line(error: BaseException) -> str:
  """The error's message on one line (some libraries put newlines in theirs)."""
  text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
  return text or type(error).__name__


class _OnlyClflax(logging.Filter):
  """The console gets clflax's own lines and every library's warnings; the libraries' INFO chatter only with
  --verbosity >= 1."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


class _Plain(logging.Formatter):
  """'14:02:07 message' for clflax's lines; warnings and errors say so."""

  def format(self, record):
    text = record.getMessage()
    if record.levelno >= logging.WARNING:
      text = f'{record.levelname.lower()}: {text}'
    return f'{self.formatTime(record, "%H:%M:%S")} {text}'


def quiet_environment(environ=os.environ) -> None:
  """Before TensorFlow, XLA and TFDS load: fewer of their C++ INFO lines."""
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  environ.setdefault('GRPC_VERBOSITY', 'ERROR')


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (clu's TensorBoard writer needs it) with the C++ lines it writes straight to the process's
  stderr while loading (absl's "All log messages before absl::InitializeLog()" warning, oneDNN notices) held back;
  shown only if the import fails. TensorFlow 2.21 ignores TF_CPP_MIN_LOG_LEVEL for them."""
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as held:
    os.dup2(held.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def configure_console(verbose: bool) -> None:
  """One clean line per clflax event on stderr; with `verbose` also the libraries' INFO lines, absl-formatted."""
  handler = absl_logging.get_absl_handler()
  if not verbose:
    handler.setFormatter(_Plain())
    if not any(isinstance(f, _OnlyClflax) for f in handler.filters):
      handler.addFilter(_OnlyClflax())
  absl_logging.set_verbosity(absl_logging.INFO)
  for name in ('jax._src.xla_bridge', 'jax._src.compiler', 'absl.orbax'):
    logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.INFO)


def _setup_compilation(config) -> None:
  """Persistent compile cache: CLFLAX_COMPILATION_CACHE ('' disables it), else the cache the embedding process set
  (tests), else ~/.cache/clflax/xla. Compiled steps are then reused across runs and resumes."""
  import jax  # pylint: disable=g-import-not-at-top  (after the flags are valid)
  cache = os.environ.get('CLFLAX_COMPILATION_CACHE')
  if cache is None and not jax.config.jax_compilation_cache_dir:
    cache = os.path.expanduser('~/.cache/clflax/xla')
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  if config.fast_compile:
    jax.config.update('jax_disable_most_optimizations', True)


def _run_line(config, workdir: str, config_arg: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from clflax import __version__  # pylint: disable=g-import-not-at-top
  from clflax.data import sources  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  where = f'{len(devices)} {devices[0].platform} device{"s" if len(devices) > 1 else ""}'
  if jax.process_count() > 1:
    where += f' over {jax.process_count()} processes'
  data = sources.short_description(config.data_dir)
  return (f'clflax {__version__}: {workdir} | config {config_arg} | strategy {"+".join(config.strategy.names)} | '
          f'{where} | data {data}')


def run(config, workdir: str, *, fresh: bool = False, debug: bool = False, config_arg: str = '', data=None) -> int:
  """Validates `config`, prepares `workdir` and trains (on `data` when given, see train_and_evaluate); returns the
  process exit code."""
  from clflax.configs import validation  # pylint: disable=g-import-not-at-top
  from clflax.runtime import distributed  # pylint: disable=g-import-not-at-top
  from clflax.trainer import hooks as hooks_lib  # pylint: disable=g-import-not-at-top
  from clflax.trainer import workdirs  # pylint: disable=g-import-not-at-top
  try:
    hooks = hooks_lib.from_environment()  # Validates CLFLAX_FAULT.
    distributed.maybe_initialize(config)
    validation.sync_classic_tasks(config)
    import jax  # pylint: disable=g-import-not-at-top
    validation.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    validation.check_pretrained(config)
    _setup_compilation(config)
    first = jax.process_index() == 0  # Files and the workdir lock are process 0's (multi-process runs).
    workdir = workdirs.prepare(workdir, config, fresh=fresh, write=first)
    absl_logging.info('%s', _run_line(config, workdir, config_arg))
    absl_logging.info('%s', hugepages.status())
    with workdirs.lock(workdir, holder=first):
      from clflax.reporting import report  # pylint: disable=g-import-not-at-top
      from clflax.reporting import results as results_lib  # pylint: disable=g-import-not-at-top
      from clflax.trainer import train  # pylint: disable=g-import-not-at-top  (heavy; only for a valid config)
      results = train.train_and_evaluate(config, workdir, hooks, data)
      if jax.process_index() == 0:
        print(report.console_summary(results), file=sys.stderr)
        paths = [os.path.join(workdir, 'results.json'), os.path.join(workdir, 'summary.md')]
        paths += results_lib.plot_paths(workdir)
        print('\nwrote ' + ', '.join(paths) + f'\nTensorBoard: tensorboard --logdir {workdir}', file=sys.stderr)
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


def _fail(message: str) -> None:
  """User errors exit with status 2."""
  print(message, file=sys.stderr)
  sys.exit(2)


def _last_line(error: BaseException) -> str:
  """The informative line of a config_flags error (they embed the config file's traceback as text)."""
  text = f'{error}\n{error.__cause__ or ""}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


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


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config configs/agem.py')
  verbose = flags.FLAGS.verbosity >= 1
  configure_console(verbose)
  if not verbose:
    import_tensorflow_quietly()
  config_arg = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    config = _CONFIG.value
    config.get('seed')  # config_flags loads lazily: surface a missing or broken file here.
  except OSError as e:
    if _DEBUG.value:
      raise
    _fail(f'error: cannot load --config: {_last_line(e)}')
  workdir = _WORKDIR.value or default_workdir(config_arg)
  sys.exit(run(config, workdir, fresh=_FRESH.value, debug=_DEBUG.value, config_arg=config_arg))


def config_folder(argv) -> str | None:
  """The folder of the --config file in `argv` (its own modules, e.g. a strategy of yours, import from there)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return os.path.dirname(os.path.abspath(value.partition(':')[0]))
  return None


def main():
  """The console entry (`clflax`, `python -m clflax`, launch.py)."""
  hugepages.ensure()  # Restarts this command once with huge pages for XLA:CPU's buffers (runtime/hugepages.py).
  quiet_environment()
  folder = config_folder(sys.argv)
  if folder and folder not in sys.path:
    sys.path.insert(0, folder)
  app.run(_main, flags_parser=_parse_flags)
