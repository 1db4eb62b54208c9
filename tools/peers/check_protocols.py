"""Checks that protocols.py builds the same tasks as clflax (same permutations, training rows, test rows, labels).

Run it with clflax's own environment (it imports clflax.data.benchmarks, which needs JAX), from the repository root:
  .venv/bin/python tools/peers/check_protocols.py [--data ../shared/data/mnist] [--seeds 0 1 2]
It also checks the smoke sizes (a few hundred examples per task), where the rng draws matter for every task.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))

import protocols  # noqa: E402  pylint: disable=wrong-import-position


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--data', default=protocols.DEFAULT_DATA)
  ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  args = ap.parse_args()
  from clflax.data import benchmarks  # pylint: disable=import-outside-toplevel
  data = benchmarks.load_mnist(args.data)
  mine_data = protocols.load_mnist(args.data)
  for split in ('train', 'test'):
    assert all(np.array_equal(a, b) for a, b in zip(data[split], mine_data[split])), split
  failures = 0
  for protocol in ('permuted', 'split'):
    p = protocols.PROTOCOLS[protocol]
    for seed in args.seeds:
      for n_train, n_test in ((None, None), (300, 200)):
        ref = benchmarks.make_task_sequence(
            data, protocol, p['num_tasks'], seed=seed, examples_per_task=n_train, test_examples_per_task=n_test,
            num_validation=p['num_validation'], classes_per_task=p['classes_per_task'])
        mine = protocols.make_tasks(mine_data, protocol, seed, n_train, n_test)
        same = {
            'images': np.array_equal(ref.images, mine.images), 'perms': np.array_equal(ref.perms, mine.perms),
            'classes': np.array_equal(ref.classes, mine.classes),
            'train_index': np.array_equal(ref.train.index, mine.train_index),
            'train_labels': np.array_equal(ref.train.labels, mine.train_labels),
            'test_index': np.array_equal(ref.test.index, mine.test_index),
            'test_labels': np.array_equal(ref.test.labels, mine.test_labels),
        }
        # Inputs of one task (the permutation applied to the pixels) as clflax's host path builds them.
        t = p['num_tasks'] - 1
        rows = mine.test_index[t][:50]
        ref_x = np.asarray(ref.images[rows].reshape(len(rows), -1).astype(np.float32) / 255.)[:, ref.perms[t]]
        same['inputs'] = np.array_equal(ref_x, protocols.task_inputs(mine, t, rows))
        ok = all(same.values())
        failures += not ok
        print(f'{protocol:8s} seed {seed} n_train={n_train} n_test={n_test}: train {mine.train_index.shape} '
              f'test {mine.test_index.shape} -> {"SAME" if ok else "DIFFERENT: " + str(same)}', flush=True)
  print('all identical' if not failures else f'{failures} differences')
  sys.exit(1 if failures else 0)


if __name__ == '__main__':
  main()
