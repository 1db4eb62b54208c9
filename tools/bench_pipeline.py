"""How fast the training input pipeline alone makes batches: images/s per task and background-thread count.

  python tools/bench_pipeline.py --data_dir ../shared/data [--image_size 224] [--threads 0 1 2 4] [--steps 40]

Each row reads `--steps` batches of `--batch` through `clflax.data.pipeline.iterate` (the trainer's own reader:
decode, random resized crop, flip, targets) after a warm-up of 2 batches, and prints images/s. Compare with a train
step's images/s (`python -m clflax.bench`): the pipeline keeps a device fed when it is several times faster.
"""
import argparse
import json
import time

from clflax.data import pipeline
from clflax.data import sources


def rate(task: str, source, *, image_size: int, batch: int, threads: int, steps: int) -> float:
  ds = pipeline.make_train_dataset(task, source, image_size=image_size, batch_size=batch, seed=0,
                                   process_index=0, process_count=1)
  batches = pipeline.iterate(ds, 0, steps + 2, num_threads=threads, prefetch=2 * max(threads, 1))
  next(batches), next(batches)  # Warm-up: thread start, first decodes.
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', required=True, help='folder holding mini_voc_seg, mini_coco_det, imagenette_160')
  parser.add_argument('--tasks', nargs='+', default=['seg', 'det', 'cls'])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--threads', type=int, nargs='+', default=[0, 1, 2, 4])
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--json', default='', help='also write the rows here')
  args = parser.parse_args(argv)
  rows = []
  print('| task | threads | images/s |\n|---|---:|---:|')
  for task in args.tasks:
    source = sources.load_task_source(task, args.data_dir)['train']
    for threads in args.threads:
      r = rate(task, source, image_size=args.image_size, batch=args.batch, threads=threads, steps=args.steps)
      rows.append({'task': task, 'threads': threads, 'images_per_s': r, 'image_size': args.image_size,
                   'batch': args.batch, 'steps': args.steps})
      print(f'| {task} | {threads} | {r:.0f} |', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
