r"""Steps/s of one scanned classic-protocol epoch, exactly as a stage runs it (`setup.stage_program`).

  python -m clflax.bench.epoch --data_dir ../shared/data --strategy progressive --stages 1,9,17 --steps 1000

Each stage's epoch is compiled and run once untimed (cold), then timed `--repeats` times; the median is reported with
the 1-minute load average (timings only compare on similarly loaded cores). Stage k starts from the initial state
with stage k's fresh optimizer state (memories empty): the step's cost, not
its learning, is measured.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from clflax.trainer import optim
from clflax.trainer import parallel
from clflax.trainer import setup


def stage_state(run, tree, k):
  """The initial state with stage k's fresh optimizer state, as `train_and_evaluate` starts a stage."""
  task = run.config.tasks[k]
  tx = optim.make_tx(run.config, run.data.steps_per_epoch[task], run.data.example_batches[task], stage=k, task=task)
  state = tree.state
  return state._replace(opt_state=optim.fresh_optimizer_state(run.config, tx, state.params, state.opt_state))


def time_stage(run, tree, k, repeats):
  """(cold seconds, [warm seconds]) of stage k's scanned epoch."""
  task = run.config.tasks[k]
  stage_fn = setup.stage_program(run, k, task)
  pool, _, ids = run.data.scan
  times = []
  for _ in range(repeats + 1):
    state = parallel.copy_tree(stage_state(run, tree, k))  # The epoch donates its state.
    start = time.time()
    state, stacked = stage_fn(state, tree.context, pool, ids[task], 0)
    jax.block_until_ready((state, stacked))
    times.append(time.time() - start)
  return times[0], times[1:]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--strategy', default='progressive', help='a configs/permuted_mnist.py arg')
  parser.add_argument('--stages', default='1', help='1-based stages to time, comma-separated')
  parser.add_argument('--steps', type=int, default=1000, help='steps per timed epoch (train.steps_per_epoch)')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  from configs import permuted_mnist  # pylint: disable=g-import-not-at-top
  config = permuted_mnist.get_config(args.strategy)
  config.data_dir, config.train.steps_per_epoch = args.data_dir, args.steps
  with tempfile.TemporaryDirectory() as workdir:
    run, tree = setup.setup_run(config, workdir)
    for stage in (int(s) for s in args.stages.split(',')):
      load = os.getloadavg()[0]
      cold, warm = time_stage(run, tree, stage - 1, args.repeats)
      median = statistics.median(warm)
      print(json.dumps({'strategy': args.strategy, 'stage': stage, 'steps': args.steps, 'cold_s': round(cold, 2),
                        'warm_s': [round(t, 3) for t in warm], 'steps_per_s': round(args.steps / median, 1),
                        'load_before': round(load, 2), 'load_after': round(os.getloadavg()[0], 2)}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
