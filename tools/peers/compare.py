"""The "clflax beside Avalanche" markdown table from a run_all.sh results folder (standard library only).

  python tools/peers/compare.py RESULTS_DIR [--seed 0] [--smoke]

Reads, per row, RESULTS_DIR/avalanche/<row>_seed<S>.json (avalanche_runner.py) and RESULTS_DIR/clflax/<row>_seed<S>/
results.json (launch.py), plus each side's <row>_seed<S>.timed.json (timed.py: the whole process). Columns:
  A_T       mean final accuracy over the trained tasks (%)
  F_T       forgetting, clflax's definition on both sides (points): mean over earlier tasks of best - final
  process   wall time of the whole command: interpreter start to exit (imports, data, compiles included)
  loop      the stage loop alone: Avalanche's task loop (train + eval, `wall_s`); clflax's stages (`total_seconds`:
            train, eval, checkpoints, consolidation)
  steps/s   training steps per second: Avalanche's steps / `train_s` (its end-of-task plugin work included);
            clflax's steps / `train_seconds` (compiles, eval, checkpoints and consolidation excluded)
"""
import argparse
import json
import os
import sys

ROWS = (  # (row, protocol, method)
    ('permuted_naive', 'Permuted MNIST (17 tasks)', 'naive / vanilla'),
    ('permuted_ewc', 'Permuted MNIST (17 tasks)', 'EWC'),
    ('permuted_replay', 'Permuted MNIST (17 tasks)', 'ER (replay)'),
    ('permuted_agem', 'Permuted MNIST (17 tasks)', 'A-GEM'),
    ('split_replay', 'Split MNIST, class-incremental (5 tasks)', 'ER (replay)'),
)


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _sides(results_dir, row, seed, suffix):
  """{'Avalanche': (A_T, F_T, process s, loop s, steps/s), 'clflax': ...}; a side that did not run is missing."""
  sides = {}
  av = _load(os.path.join(results_dir, 'avalanche', f'{row}{suffix}_seed{seed}.json'))
  av_timed = _load(os.path.join(results_dir, 'avalanche', f'{row}{suffix}_seed{seed}.timed.json')) or {}
  if av is not None:
    sides['Avalanche'] = (100 * av['A_T'], 100 * av['F_T'], av_timed.get('wall_s'), av['wall_s'],
                          av['train_steps_per_s'])
  cl = _load(os.path.join(results_dir, 'clflax', f'{row}{suffix}_seed{seed}', 'results.json'))
  cl_timed = _load(os.path.join(results_dir, 'clflax', f'{row}{suffix}_seed{seed}.timed.json')) or {}
  if cl is not None:
    head, timing = cl['summary']['headline'], cl['timing']
    sides['clflax'] = (head['acc'], head['forgetting'], cl_timed.get('wall_s'), timing['total_seconds'],
                       timing.get('train_steps_per_s'))
  return sides


def _num(x, digits=1):
  return '–' if x is None else f'{x:,.{digits}f}'


def _ratio(slow, fast):
  return '–' if not slow or not fast else f'{slow / fast:.1f}x'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results_dir')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--smoke', action='store_true', help='the rows of a SMOKE=1 run')
  args = parser.parse_args(argv)
  print('| protocol | method | library | A_T % | F_T pts | process s | loop s | train steps/s | '
        'clflax faster (process / steps/s) |')
  print('|---|---|---|---:|---:|---:|---:|---:|---:|')
  for row, protocol, method in ROWS:
    sides = _sides(args.results_dir, row, args.seed, '_smoke' if args.smoke else '')
    for library, values in sides.items():
      a_t, f_t, process, loop, rate = values
      speed = ''
      if library == 'clflax' and 'Avalanche' in sides:
        av = sides['Avalanche']
        speed = f'{_ratio(av[2], process)} / {_ratio(rate, av[4]) if rate and av[4] else "–"}'
      print(f'| {protocol} | {method} | {library} | {a_t:.2f} | {f_t:.2f} | {_num(process)} | {_num(loop)} | '
            f'{_num(rate, 0)} | {speed} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
