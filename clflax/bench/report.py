"""The benchmark's reading: ratios between its rows, the PyTorch reference's times, the goals met, the table."""
import json
import os
import statistics
from typing import Optional

# Goals of issue 7 (ratios against the PyTorch reference run in the same session).
GOALS = {'speedup_vs_torch': 1.5, 'agem_over_plain': 2.1, 'ewc_over_plain': 1.05, 'fisher_speedup_vs_torch': 10.0}


def read_torch_ref(folder: str, res: int) -> dict:
  """The PyTorch reference's medians at resolution `res` from its JSON-lines results."""
  ref = {'step': {}, 'ewc': {}, 'agem': {}, 'fisher': {}}
  for name in ('multitask_step.jsonl', 'ewc.jsonl', 'agem.jsonl'):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      records = [json.loads(line) for line in f if line.startswith('{')]
    for r in records:
      if r.get('res') != res:
        continue
      if r['kind'] == 'train_step':
        ref['step'][r['head']] = r['median_s']
      elif r['kind'] == 'ewc_step':
        ref['ewc'].setdefault(r['head'], {})[r['variant']] = r['median_s']
      elif r['kind'] == 'agem_cnn':
        ref['agem'].setdefault(r['head'], {})[r['variant']] = r['median_s']
      elif r['kind'] == 'fisher_per_sample':
        ref['fisher'][r['head']] = r['s_per_sample_overall']
  return ref


def torch_seconds(ref: dict, head: str, strategy: str) -> Optional[float]:
  """The reference's step time for the same head and strategy (None where it has no such step)."""
  if strategy == 'naive':
    return ref['step'].get(head)
  if strategy == 'ewc':
    return ref['ewc'].get(head, {}).get('ewc')
  if strategy == 'agem':
    return ref['agem'].get(head, {}).get('agem')
  return None


def paired_ratio(row: dict, plain: dict) -> tuple[float, Optional[tuple[float, float]]]:
  """row's time over plain's: the median of the per-round ratios and their quartiles where both rows kept their
  runs from the same interleaved rounds (a slow spell of the machine then cancels in each round's ratio), else the
  ratio of medians and no quartiles."""
  times, plain_times = row.get('times_s'), plain.get('times_s')
  if not times or not plain_times or len(times) != len(plain_times):
    return row['median_s'] / plain['median_s'], None
  per_round = [t / p for t, p in zip(times, plain_times)]
  if len(per_round) < 2:
    return per_round[0], None
  q1, _, q3 = statistics.quantiles(per_round, n=4, method='inclusive')
  return statistics.median(per_round), (q1, q3)


def compare(rows: list[dict], ref: Optional[dict]) -> dict:
  """Ratios of the measured rows (and against the reference, when given) and which goals are met."""
  steps = {(r['head'], r['strategy']): r for r in rows if r['kind'] == 'step'}
  out = {'ratios': {}, 'ratio_quartiles': {}, 'goals': {}}
  for (head, strategy), r in steps.items():
    plain = steps.get((head, 'naive'))
    if plain and strategy != 'naive':
      name = f'{strategy}/naive {head}'
      out['ratios'][name], quartiles = paired_ratio(r, plain)
      if quartiles:
        out['ratio_quartiles'][name] = quartiles
    if ref and (ts := torch_seconds(ref, head, strategy)):
      r['torch_median_s'] = ts
      r['speedup_vs_torch'] = ts / r['median_s']
  for r in rows:
    if r['kind'] == 'fisher':
      plain = steps.get((r['head'], 'naive'))
      if plain:
        r['batched_s_per_image'] = 1.0 / plain['images_per_s']
        r['fisher_over_batched_per_image'] = r['s_per_sample'] / r['batched_s_per_image']
      if ref and r['head'] in ref['fisher']:
        r['torch_s_per_sample'] = ref['fisher'][r['head']]
        r['fisher_speedup_vs_torch'] = ref['fisher'][r['head']] / r['s_per_sample']

  def goal(name, values, ok):
    if values:
      out['goals'][name] = {'values': values, 'target': GOALS[name.split(' ')[0]],
                            'met': all(ok(v) for v in values.values())}

  goal('speedup_vs_torch', {f"{r['strategy']} {r['head']}": r['speedup_vs_torch'] for r in steps.values()
                            if 'speedup_vs_torch' in r}, lambda v: v >= GOALS['speedup_vs_torch'])
  for strategy, key in (('agem', 'agem_over_plain'), ('ewc', 'ewc_over_plain')):
    goal(key, {k.split(' ')[1]: v for k, v in out['ratios'].items() if k.startswith(f'{strategy}/')},
         lambda v, key=key: v <= GOALS[key])
  goal('fisher_speedup_vs_torch', {r['head']: r['fisher_speedup_vs_torch'] for r in rows
                                   if 'fisher_speedup_vs_torch' in r},
       lambda v: v >= GOALS['fisher_speedup_vs_torch'])
  return out


def table(rows: list[dict], comparison: dict) -> str:
  """The human-readable report."""
  lines = [f"{'head':4} {'strategy':9} {'median s':>9} {'img/s':>7} {'trace s':>8} {'cold s':>8} "
           f"{'cached s':>8} {'torch s':>8} {'x torch':>7}"]
  for r in rows:
    if r['kind'] == 'step':
      cached = r.get('compile_cached_s')
      lines.append(f"{r['head']:4} {r['strategy']:9} {r['median_s']:9.3f} {r['images_per_s']:7.2f} "
                   f"{r['trace_s']:8.2f} {r['compile_cold_s']:8.2f} "
                   f"{'-' if cached is None else format(cached, '8.2f'):>8} "
                   f"{format(r['torch_median_s'], '8.3f') if 'torch_median_s' in r else '-':>8} "
                   f"{format(r['speedup_vs_torch'], '7.2f') if 'speedup_vs_torch' in r else '-':>7}")
  for r in rows:
    if r['kind'] == 'fisher':
      extra = ''
      if 'batched_s_per_image' in r:
        extra += f", batched step {r['batched_s_per_image']:.4f} s/image (x{r['fisher_over_batched_per_image']:.2f})"
      if 'torch_s_per_sample' in r:
        extra += f", torch loop {r['torch_s_per_sample']:.4f} s/sample (x{r['fisher_speedup_vs_torch']:.2f} faster)"
      lines.append(f"fisher {r['head']}: {r['s_per_sample']:.4f} s/sample over {r['n_samples']} "
                   f"(compile {r['compile_cold_s']:.1f} s){extra}")
    elif r['kind'] == 'classic':
      lines.append(f"classic Permuted-MNIST: {r['skipped']}" if 'skipped' in r else
                   f"classic Permuted-MNIST: {r['wall_s']:.1f} s wall (exit {r['returncode']})")
  for name, v in comparison['ratios'].items():
    quartiles = comparison.get('ratio_quartiles', {}).get(name)
    spread = f' (per round: quartiles {quartiles[0]:.3f}-{quartiles[1]:.3f})' if quartiles else ''
    lines.append(f'ratio {name}: {v:.3f}{spread}')
  for name, g in comparison['goals'].items():
    values = ', '.join(f'{k} {v:.2f}' for k, v in g['values'].items())
    lines.append(f"goal {name} (target {g['target']}): {'MET' if g['met'] else 'NOT MET'} [{values}]")
  return '\n'.join(lines)
