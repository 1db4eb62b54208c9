r"""Reproduces the A-GEM paper's Permuted-MNIST table: every strategy x seeds, printed beside the published numbers.

  python -m tools.agem_table --data_dir ../shared/data --seeds 0,1,2,3,4 --out runs/agem_table

Each run is `configs/permuted_mnist.py:<strategy>` through the normal trainer, in its own workdir under --out (a rerun
skips finished runs and resumes unfinished ones). A_T is the mean accuracy over the 17 tasks after the last one; F_T
the mean over earlier tasks of their best accuracy minus their final one (as fractions, like the paper).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

# Chaudhry et al., ICLR 2019, Table 1 (Permuted MNIST): A_T (%), F_T.
PUBLISHED = {'vanilla': (47.95, 0.51), 'ewc': (68.35, 0.29), 'ewc_running': (68.35, 0.29), 'mas': (69.85, 0.27),
             'si': (None, None), 'agem': (89.12, 0.07), 'replay': (None, None), 'agem+replay': (None, None),
             'joint': (95.4, None), 'gem': (90.30, 0.06)}
DEFAULT_STRATEGIES = ('vanilla', 'ewc', 'ewc_running', 'mas', 'si', 'agem', 'replay', 'agem+replay', 'replay+der',
                      'joint')


def scores(results: dict) -> tuple[float, float]:
  """(A_T in %, F_T as a fraction) from a results.json dict."""
  matrix = np.asarray(results['metrics']['acc'], float)
  final = matrix[-1]
  forgetting = [matrix[:-1, j].max() - final[j] for j in range(matrix.shape[1] - 1)]
  return float(final.mean()), float(np.mean(forgetting) / 100) if forgetting else 0.0


def run_one(strategy: str, seed: int, data_dir: str, workdir: str, overrides: dict) -> dict:
  """Runs (or resumes, or reads) one strategy/seed; returns its results.json dict."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    from clflax import cli  # pylint: disable=g-import-not-at-top
    from configs import permuted_mnist  # pylint: disable=g-import-not-at-top
    config = permuted_mnist.get_config(strategy)
    config.seed, config.data_dir = seed, data_dir
    for key, value in overrides.items():
      section, name = key.rsplit('.', 1)
      node = config
      for part in section.split('.'):
        node = node[part]
      node[name] = type(node[name])(value)
    start = time.time()
    code = cli.run(config, workdir)
    if code:
      raise SystemExit(f'{strategy} seed {seed} failed (exit {code}); see {workdir}')
    print(f'{strategy} seed {seed}: {time.time() - start:.0f} s', flush=True)
  with open(path) as f:
    return json.load(f)


def table(rows: dict[str, list[tuple[float, float, float]]]) -> str:
  """Markdown: strategy, A_T mean ± std, F_T mean ± std, published A_T / F_T, wall time per run."""
  lines = ['| method | A_T (%) | F_T | published A_T / F_T | seeds | wall time per run (s) |',
           '|---|---:|---:|---:|---:|---:|']
  for name, values in rows.items():
    acc, forget, seconds = (np.asarray(v) for v in zip(*values))
    pub = PUBLISHED.get(name, (None, None))
    published = '—' if pub[0] is None else f'{pub[0]:.2f} / ' + ('—' if pub[1] is None else f'{pub[1]:.2f}')
    spread = lambda x, digits: f' ± {np.std(x, ddof=1):.{digits}f}' if len(x) > 1 else ''  # noqa: E731  (1 seed: none)
    lines.append(f'| {name} | {acc.mean():.2f}{spread(acc, 2)} | {forget.mean():.3f}{spread(forget, 3)} | '
                 f'{published} | {len(acc)} | {seconds.mean():.0f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', required=True, help='folder holding mnist/ (the four idx files)')
  parser.add_argument('--strategies', default=','.join(DEFAULT_STRATEGIES))
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--out', default='runs/agem_table')
  parser.add_argument('--set', action='append', default=[], help='config override key=value, e.g. classic.num_tasks=5')
  args = parser.parse_args(argv)
  overrides = dict(item.split('=', 1) for item in args.set)
  rows = {}
  for strategy in args.strategies.split(','):
    for seed in (int(s) for s in args.seeds.split(',')):
      workdir = os.path.join(args.out, f'{strategy}_seed{seed}')
      results = run_one(strategy, seed, args.data_dir, workdir, overrides)
      acc, forgetting = scores(results)
      rows.setdefault(strategy, []).append((acc, forgetting, results['timing']['total_seconds']))
  text = table(rows)
  print(text)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
