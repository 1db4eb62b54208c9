"""Prints a markdown table of avalanche_runner.py JSON files (standard library only).

  python tools/peers/table.py runs/peers/avalanche/*_seed0.json
"""
import json
import os
import sys


def main(paths):
  rows = []
  for path in paths:
    with open(path) as f:
      d = json.load(f)
    rows.append((os.path.basename(path)[:-5], d))
  first = rows[0][1] if rows else {}
  v, m = first.get('versions', {}), first.get('machine', {})
  print(f"Avalanche {v.get('avalanche')}, torch {v.get('torch')}, Python {v.get('python')}; "
        f"{m.get('cpu_model')}, {m.get('torch_threads')} torch threads, {m.get('cpu_count')} CPUs")
  print()
  print('| run | protocol | strategy | lr | tasks x examples | A_T | F_T | wall s | train s | eval s | '
        'train steps/s | other CPU | smoke |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for name, d in rows:
    print(f"| {name} | {d['protocol']} | {d['strategy']} | {d['lr']} | {len(d['train_tasks'])} x "
          f"{d['n_train_per_task']} | {100 * d['A_T']:.2f}% | {d['F_T']:.3f} | {d['wall_s']:.1f} | "
          f"{d['train_s']:.1f} | {d['eval_s']:.1f} | {d['train_steps_per_s']:.0f} | "
          f"{d.get('cpu_busy', {}).get('other', float('nan')):.2f} | {'yes' if d.get('smoke') else 'no'} |")


if __name__ == '__main__':
  main(sys.argv[1:])
