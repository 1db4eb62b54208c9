r"""Benchmarks of the trainer's own compiled steps: `python -m clflax.bench`.

Every timed step is `steps.jit_train_step` with `optim.make_tx`, exactly as a stage runs it (state donated,
replicated over the mesh, batch sharded), on random inputs of the right shapes. Rows:
  step      per head x strategy: median seconds after warm-up, images/s, trace / cold compile / cached compile s;
            a head's strategies are timed interleaved (one step of each in turn), so their ratios share the drift;
            a ratio to the plain step is the median over rounds of the two steps' times in that round, with quartiles
  fisher    EWC's per-example Fisher (ewc.fisher_diagonal, as consolidate runs it): seconds per example,
            against the batched naive step's seconds per image
  classic   wall time of the Permuted-MNIST A-GEM run (launch.py in a subprocess; needs the MNIST data)
With `--torch_ref DIR` (results/*.jsonl of the PyTorch reference, /work/shared/bench/pytorch_ref) it adds the
speed ratios and says which goals are met. Timings only mean something on a quiet machine: the 1-minute load
average is recorded before and after.

  python -m clflax.bench                                   # Lite0, 224 px, batch 8
  python -m clflax.bench --backbone b0 --torch_ref results  # beside the PyTorch B0 reference
  python -m clflax.bench --backbone tiny --image_size 32 --batch 2 --iters 1 --warmup 0   # seconds
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from clflax.bench import report as bench_report
from clflax.trainer import consolidate
from clflax.runtime import hugepages
from clflax.trainer import optim
from clflax.trainer import parallel
from clflax.trainer import steps
from clflax.trainer import setup
from clflax.models import multitask
from clflax.strategies import ewc
from clflax.strategies import registry
from clflax.strategies import replay

STRATEGIES = {'naive': ('naive',), 'ewc': ('ewc',), 'agem': ('agem',), 'replay': ('replay',),
              'ewc+agem': ('ewc', 'agem')}
HEADS = ('seg', 'det', 'cls')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIC_CONFIG = os.path.join(ROOT, 'configs', 'permuted_mnist.py')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m clflax.bench', description=__doc__.split('\n')[0])
  p.add_argument('--backbone', default='lite0', help='EfficientNet variant (b0..b7, lite0..lite4, tiny).')
  p.add_argument('--image_size', type=int, default=224, help='Square input resolution.')
  p.add_argument('--batch', type=int, default=8, help='Global batch (memory / replay batches are the same size).')
  p.add_argument('--heads', nargs='+', default=list(HEADS), choices=HEADS)
  p.add_argument('--strategies', nargs='+', default=list(STRATEGIES), choices=list(STRATEGIES))
  p.add_argument('--warmup', type=int, default=2, help='Untimed runs after compilation.')
  p.add_argument('--iters', type=int, default=5, help='Timed runs; the median is reported.')
  p.add_argument('--settle', type=int, default=1, help='Untimed runs of the same step right before each timed one.')
  p.add_argument('--fisher_samples', type=int, default=16, help='Examples per Fisher run (0 skips the Fisher).')
  p.add_argument('--fisher_chunk', type=int, default=4, help='chunk_size of ewc.fisher_diagonal (consolidate: 4).')
  p.add_argument('--depthwise', default='auto', choices=('auto', 'shifted', 'xla'))
  p.add_argument('--fast_compile', action='store_true', help='jax_disable_most_optimizations (tiny models only).')
  p.add_argument('--no_compile_cache', action='store_true', help='Skip the cached-compile measurement.')
  p.add_argument('--cache_dir', default='', help="Persistent compilation cache ('' = a fresh temporary folder).")
  p.add_argument('--classic', choices=('auto', 'skip'), default='auto', help='Time the Permuted-MNIST run.')
  p.add_argument('--classic_args', default='', help="Extra launch.py flags for the Permuted-MNIST run, given with '=' "
                 "as they start with dashes: --classic_args='--config.data_dir=DIR'.")
  p.add_argument('--torch_ref', default='', help='Folder with the PyTorch reference multitask_step/ewc/agem.jsonl.')
  p.add_argument('--json', default='', help="Output JSON path ('' = bench_<backbone>_<size>_b<batch>.json).")
  args = p.parse_args(argv)
  for name in ('image_size', 'batch', 'iters'):
    if getattr(args, name) <= 0:
      raise ValueError(f'--{name}={getattr(args, name)} must be > 0')
  for name in ('warmup', 'settle', 'fisher_samples', 'fisher_chunk'):
    if getattr(args, name) < 0:
      raise ValueError(f'--{name}={getattr(args, name)} must be >= 0')
  if args.image_size % 32:
    raise ValueError(f'--image_size={args.image_size} must be a multiple of 32')
  if args.torch_ref and not os.path.isdir(args.torch_ref):
    raise FileNotFoundError(f'--torch_ref={args.torch_ref!r} is not a directory')
  return args


def load() -> float:
  """The 1-minute load average: timings are only comparable on a quiet machine."""
  return os.getloadavg()[0]


def bench_config(args, names: tuple[str, ...]):
  """The default run's config with the benchmark's model, batch and strategy (random init)."""
  spec = importlib.util.spec_from_file_location('_clflax_default_config', os.path.join(ROOT, 'configs', 'default.py'))
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  config = default.get_config()
  config.fast_compile = bool(args.fast_compile)
  config.model.backbone = args.backbone
  config.model.pretrained = ''
  config.model.image_size = args.image_size
  config.model.depthwise = args.depthwise
  config.train.batch_size = args.batch
  config.strategy.names = names
  config.strategy.agem.ref_batch = args.batch  # As the PyTorch reference: memory batch = batch.
  config.strategy.replay.batch = args.batch
  for name in ('agem', 'replay'):
    config.strategy[name].memory_per_task = 2 * args.batch
  if args.backbone == 'tiny':
    config.model.neck_channels = 16
  return config


def fake_batch(task: str, batch: int, size: int, seed: int = 0, max_boxes: int = 32) -> dict:
  """Random inputs with the pipeline's keys, shapes and dtypes (clflax.data.pipeline)."""
  rng = np.random.default_rng(seed)
  out = {'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), 'valid': np.ones(batch, bool)}
  if task == 'seg':
    mask = rng.integers(0, 21, (batch, size, size)).astype(np.int32)
    out['mask'] = np.where(rng.random(mask.shape) < 0.1, 255, mask).astype(np.int32)
  elif task == 'det':
    corner = rng.uniform(0, size / 2, (batch, max_boxes, 2))
    extent = rng.uniform(8, size / 2, (batch, max_boxes, 2))
    out['boxes'] = np.concatenate([corner, corner + extent], -1).astype(np.float32)
    out['classes'] = rng.integers(0, 80, (batch, max_boxes)).astype(np.int32)
    out['box_valid'] = np.arange(max_boxes)[None] < rng.integers(1, max_boxes // 4 + 2, (batch, 1))
    out['image_id'] = np.arange(batch, dtype=np.int32)
  elif task == 'cls':
    out['label'] = rng.integers(0, 10, (batch,)).astype(np.int32)
  else:
    raise ValueError(f'unknown task {task!r}; expected one of {HEADS}')
  return out


class Setup(NamedTuple):
  """One head x strategy: the trainer's jitted step, a way to build it anew, and its arguments."""
  step_fn: Any
  remake: Callable[[], Any]  # A new jitted step (new trace; compiles from the persistent cache).
  state: Any
  batch: dict
  context: Any


@jax.jit
def _ewc_stand_ins(params, key):
  """A random Fisher and an anchor 1% away: the penalty then does the work of a consolidated task."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, 2 * len(leaves))
  fisher = [jax.random.uniform(k, p.shape, p.dtype) for k, p in zip(keys[::2], leaves)]
  anchor = [p + 0.01 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys[1::2], leaves)]
  return jax.tree.unflatten(treedef, fisher), jax.tree.unflatten(treedef, anchor)


def setup_step(config, task: str, model, variables, mesh) -> Setup:
  """The stage's step of head `task` with strategy config.strategy.names, as the trainer builds it.

  Memory strategies see one earlier task: the same head, with a full memory (as the PyTorch reference's
  memory batch); EWC has a random non-zero Fisher and a moved anchor, so its penalty does real work.
  """
  names = set(config.strategy.names)
  variables = jax.device_put(jax.device_get(variables))  # Own buffers: the state is donated.
  tx = optim.make_tx(config, steps_per_epoch=100)
  state = optim.initial_state(config, variables, tx)
  if 'ewc' in names:
    fisher, anchor = _ewc_stand_ins(state.params, jax.random.PRNGKey(7))
    state = state._replace(opt_state=registry.replace_state(
        state.opt_state, ewc.EwcState, lambda s: ewc.consolidate(s, anchor, fisher)))
  earlier = (task,) if names & {'agem', 'replay'} else ()
  memories = {}
  for old in earlier:
    examples = consolidate.with_valid(fake_batch(old, 2 * config.train.batch_size, config.model.image_size, 1))
    memories[old] = replay.append(consolidate.empty_memory(examples, 2 * config.train.batch_size), examples)
  context = steps.Context(memories, {})
  state, context = parallel.replicate(mesh, (state, context))

  def remake():
    return steps.jit_train_step(model, tx, task, earlier, config, parallel.replicated(mesh),
                                parallel.batch_sharding(mesh))

  batch = parallel.shard_batch(mesh, fake_batch(task, config.train.batch_size, config.model.image_size))
  return Setup(remake(), remake, state, batch, context)


class CacheEvents:
  """Counts persistent compilation cache hits (jax.monitoring events) while the benchmark runs."""

  def __init__(self):
    self.hits = 0
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event, **kwargs):
    del kwargs
    if event == '/jax/compilation_cache/cache_hits':
      self.hits += 1


def compile_step(fn, args: tuple) -> tuple[Any, float, float]:
  """(executable, trace + lowering seconds, XLA compile seconds) of jitted `fn` on `args`."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def time_calls(fn, carry, rest: tuple, warmup: int, iters: int) -> tuple[list[float], Any]:
  """Runs carry, out = fn(carry, *rest) warmup + iters times; returns the timed seconds and the last carry.

  Each timed call waits for its results (jax.block_until_ready), so a run is a whole step.
  """
  times = []
  for i in range(warmup + iters):
    t = time.perf_counter()
    carry, out = fn(carry, *rest)
    jax.block_until_ready((carry, out))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return times, carry


def summary(times: Sequence[float]) -> dict:
  """Median, range and every timed run in order (round i of each row of a head ran side by side)."""
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times), 'iters': len(times),
          'times_s': list(times)}


def prepare_step(args, config, task, model, variables, mesh, cache: Optional[CacheEvents]) -> tuple[dict, Callable]:
  """Compiles the step of `task` (cold, then from the persistent cache); returns its row and a timed call.

  The call runs one whole step (it waits for the results) on the step's own state, which it carries on.
  """
  s = setup_step(config, task, model, variables, mesh)
  hits = cache.hits if cache else 0
  compiled, trace_s, compile_s = compile_step(s.step_fn, (s.state, s.batch, s.context))
  row = {'kind': 'step', 'head': task, 'strategy': '+'.join(config.strategy.names), 'trace_s': trace_s,
         'compile_cold_s': compile_s, 'cold_was_cache_hit': bool(cache and cache.hits > hits)}
  if cache and not args.no_compile_cache:
    hits = cache.hits
    _, trace2_s, compile2_s = compile_step(s.remake(), (s.state, s.batch, s.context))
    row.update(trace_again_s=trace2_s, compile_cached_s=compile2_s, cache_hit=cache.hits > hits)
  state = [s.state]  # The donated state of one call is the next call's input.

  def call() -> float:
    t = time.perf_counter()
    state[0], out = compiled(state[0], s.batch, s.context)
    jax.block_until_ready((state[0], out))
    return time.perf_counter() - t
  return row, call


def time_interleaved(calls: Sequence[Callable[[], float]], warmup: int, iters: int,
                     settle: int = 1) -> list[list[float]]:
  """`warmup` untimed rounds, then `iters` timed rounds of each call in turn (A B C A B C ...), as the PyTorch
  reference's bench_interleaved: the slow drift of a shared machine then hits every row of a head alike, and
  their ratios (A-GEM / plain, EWC / plain) stay steady where their medians move. Each timed run directly
  follows `settle` untimed runs of the same call, as in training, where a step follows the same step (on this
  2-core CPU a step run right after another executable's ran ~10% slower)."""
  for _ in range(warmup):
    for call in calls:
      call()
  times = [[] for _ in calls]
  for _ in range(iters):
    for call, out in zip(calls, times):
      for _ in range(settle):
        call()
      out.append(call())
  return times


def bench_head(args, task, model, variables, mesh, cache: Optional[CacheEvents]) -> list[dict]:
  """The rows of every requested strategy on head `task`, compiled first, then timed interleaved."""
  rows, calls = [], []
  for strategy in args.strategies:
    row, call = prepare_step(args, bench_config(args, STRATEGIES[strategy]), task, model, variables, mesh, cache)
    rows.append(row)
    calls.append(call)
    print(f"  {task} {strategy}: compiled in {row['compile_cold_s']:.1f} s", flush=True)
  for row, times in zip(rows, time_interleaved(calls, args.warmup, args.iters, args.settle)):
    row.update(summary(times), images_per_s=args.batch / statistics.median(times), load=load())
    print(f"  {task} {row['strategy']}: {row['median_s']:.3f} s (load {row['load']:.1f})", flush=True)
  return rows


def bench_fisher(args, config, task, model, variables) -> dict:
  """EWC's exact Fisher on `fisher_samples` examples, built as the EWC strategy's end_stage builds it."""
  n = args.fisher_samples
  examples = consolidate.with_valid(fake_batch(task, n, args.image_size, seed=2))
  loss_fn = consolidate.end_of_stage(model, variables, task, 0, examples, config.train).example_loss
  fn = jax.jit(lambda p, b: ewc.fisher_diagonal(loss_fn, p, b, chunk_size=args.fisher_chunk or None))
  compiled, trace_s, compile_s = compile_step(fn, (variables['params'], examples))
  times, _ = time_calls(lambda carry, p, b: (carry, compiled(p, b)), None, (variables['params'], examples),
                        min(args.warmup, 1), args.iters)
  med = statistics.median(times)
  return {'kind': 'fisher', 'head': task, 'n_samples': n, 'chunk': args.fisher_chunk, 'trace_s': trace_s,
          'compile_cold_s': compile_s, **summary(times), 's_per_sample': med / n, 'load': load()}


def bench_classic(args) -> dict:
  """Wall time of the classic Permuted-MNIST run (launch.py in a subprocess), or a note why it is skipped."""
  if args.classic == 'skip':
    return {'kind': 'classic', 'skipped': 'skipped by --classic=skip'}
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={CLASSIC_CONFIG}:agem',
           f'--workdir={workdir}/run'] + args.classic_args.split()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
  row = {'kind': 'classic', 'command': ' '.join(cmd[1:]), 'wall_s': wall, 'returncode': proc.returncode}
  if proc.returncode:
    row['error'] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
  return row


_CACHE_FLAGS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
                'jax_persistent_cache_min_entry_size_bytes')


def run(args) -> dict:
  """Runs every requested row; returns the JSON-able results. The persistent-cache settings it needs (every
  compile cached, in `--cache_dir`) are the caller's again afterwards; `--fast_compile` stays set."""
  previous = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
  try:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir or tempfile.mkdtemp(prefix='clflax_bench_cache_'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    if args.fast_compile:
      jax.config.update('jax_disable_most_optimizations', True)
    return _run_rows(args)
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)


def _run_rows(args) -> dict:
  cache = CacheEvents()
  start_load = load()
  mesh = parallel.make_mesh()
  base = bench_config(args, ('naive',))
  model = setup.build_model(base)
  with jax.default_prng_impl('rbg'):  # As setup.setup_run.
    variables = multitask.init_variables(model, jax.random.PRNGKey(0), args.image_size)
  rows = []
  for task in args.heads:
    rows.extend(bench_head(args, task, model, variables, mesh, cache))
  if args.fisher_samples:
    for task in args.heads:
      rows.append(bench_fisher(args, bench_config(args, ('ewc',)), task, model, variables))
  rows.append(bench_classic(args))
  ref = bench_report.read_torch_ref(args.torch_ref, args.image_size) if args.torch_ref else None
  comparison = bench_report.compare(rows, ref)
  return {'args': vars(args), 'devices': [str(d) for d in jax.devices()], 'backend': jax.default_backend(),
          'host_memory': hugepages.status(), 'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
          'params': multitask.count_params(variables)['total'], 'load_start': start_load, 'load_end': load(),
          'cpu_count': os.cpu_count(), 'rows': rows, **comparison}


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args = parse_args(argv)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  results = run(args)
  path = args.json or f'bench_{args.backbone}_{args.image_size}_b{args.batch}.json'
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  print(f"{args.backbone} {args.image_size}px batch {args.batch}, {results['params']} params, load "
        f"{results['load_start']:.1f} -> {results['load_end']:.1f} on {results['cpu_count']} cores; "
        f"{results['host_memory']}")
  print(bench_report.table(results['rows'], results))
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  hugepages.ensure()  # Timings as launch.py trains: huge pages for XLA:CPU's buffers (clflax/runtime/hugepages.py).
  sys.exit(main())
