"""Avalanche (avalanche-lib 0.6.0, PyTorch) on clflax's MNIST protocols, for a "clflax beside Avalanche" table.

Not part of clflax or its tests: it needs the optional tool environment of tools/peers/README.md (torch +
avalanche-lib) and runs on the CPU.

Protocols (the tasks come from protocols.py, a numpy copy of clflax/data/benchmarks.py, so seed s gives the very
same permutations, training rows, test rows and validation hold-out as clflax with config.seed = s):
  permuted  the A-GEM paper's Permuted MNIST (clflax configs/permuted_mnist.py): 20 permutations, the first 3 for
            tuning only; 17 tasks trained in sequence, each one epoch over the 55,000 training images left after the
            5,000-image validation hold-out; after every task, accuracy on all 17 permuted 10,000-image test sets.
  split     class-incremental Split MNIST (clflax configs/split_mnist.py): 5 tasks of 2 digits in label order, one
            10-way head, no task labels; each task one epoch over clflax's 10,294 training rows of its digits (the
            smallest task's count after the hold-out) and tested on its 1,874 test rows.
Common: MLP 784-256-256-10 ReLU with the A-GEM authors' init (truncated normal std 0.1, biases 0.1, as clflax's
'agem_paper'), plain SGD (no momentum, no weight decay), batch 10, incomplete last batch dropped (as clflax: n // 10
steps per task), eval batch 1000, task label 0 for every experience (single head; Avalanche is never told the task).

Strategies (Avalanche's own implementations; README.md lists how each differs from the paper and from clflax):
  naive   Naive, lr 0.03 (clflax 'vanilla').
  ewc     Naive + EWCPlugin(ewc_lambda=10, mode='online', decay_factor=1.0), lr 0.03: one Fisher summed over tasks and
          the latest weights as anchor, penalty lambda * sum F (w - w*)^2 = clflax's strength 20 on 0.5 * sum.
          Fisher: Avalanche's (squared mini-batch gradients over the whole experience); --fisher-batch 1
          --fisher-samples 1000 gives clflax's per-example estimator on 1,000 examples instead.
  replay  Naive + ReplayPlugin(batch_size_mem=10) with ExperienceBalancedBuffer(250 * T, adaptive_size=False,
          num_experiences=T): 250 random examples kept per task; each step 10 current + 10 memory examples, the mean
          loss over the 20 at lr 0.1 (= clflax's lr 0.05 on loss_cur + loss_mem, from task 2 on).
  agem    AGEM(patterns_per_exp=250, sample_size=256), lr 0.1.

Output (--out): one JSON with the accuracy matrix, final per-task accuracies, A_T, F_T (clflax's definition), BWT,
wall / train / eval times, train steps/s, versions, CPU model, threads and the exact command.

Examples:
  python avalanche_runner.py --protocol permuted --strategy agem --seed 0 --out runs/peers/avalanche/pm_agem_s0.json
  python avalanche_runner.py --protocol split --strategy replay --train-tasks 2 --n-train 1000 --n-test 500   # smoke
"""
import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  pylint: disable=wrong-import-position
import protocols  # noqa: E402  pylint: disable=wrong-import-position

# clflax's published learning rates (clflax/configs/mnist.py PUBLISHED), as rates on Avalanche's mean loss.
LEARNING_RATES = {'naive': 0.03, 'ewc': 0.03, 'replay': 0.1, 'agem': 0.1}
CLFLAX_NAMES = {'naive': 'vanilla', 'ewc': 'ewc', 'replay': 'replay', 'agem': 'agem'}


# ---------------------------------------------------------------------------------------------------------------
# Data and model.

def build_benchmark(args):
  """Avalanche benchmark of the trained tasks: pre-permuted float32 tensors, task label 0 everywhere."""
  import torch
  from avalanche.benchmarks import tensors_benchmark
  data = protocols.load_mnist(args.data)
  tasks = protocols.make_tasks(data, args.protocol, args.seed, args.n_train or None, args.n_test or None)
  trained_ids = list(range(tasks.skip_tasks, len(tasks.perms)))  # 17 (permuted) or 5 (split) task ids.
  train_ids = trained_ids[:args.train_tasks or None]
  eval_ids = trained_ids[:args.eval_tasks or None]
  if len(eval_ids) < len(train_ids):
    raise SystemExit('--eval-tasks must be >= --train-tasks (every trained task is tested)')
  train, test = [], []
  for t in train_ids:
    x = torch.from_numpy(protocols.task_inputs(tasks, t, tasks.train_index[t]))
    train.append([x, torch.from_numpy(tasks.train_labels[t].astype(np.int64))])
  for t in eval_ids:
    x = torch.from_numpy(protocols.task_inputs(tasks, t, tasks.test_index[t]))
    test.append([x, torch.from_numpy(tasks.test_labels[t].astype(np.int64))])
  bm = tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * max(len(train), len(test)))
  return bm, tasks, train_ids, eval_ids, test


def make_model(init):
  import torch
  from torch import nn
  model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
  if init == 'agem_paper':  # tf.truncated_normal(stddev=0.1) = flax truncated_normal(0.1): cut at 2 std, no rescale.
    with torch.no_grad():
      for m in model:
        if isinstance(m, nn.Linear):
          nn.init.trunc_normal_(m.weight, mean=0., std=0.1, a=-0.2, b=0.2)
          nn.init.constant_(m.bias, 0.1)
  elif init != 'torch':
    raise ValueError(init)
  return model


# ---------------------------------------------------------------------------------------------------------------
# Strategies.

def make_plugins():
  """Plugin classes, defined here so that the module imports without torch (for --help)."""
  import torch
  from avalanche.training.plugins import EWCPlugin, SupervisedPlugin

  class TimedEWCPlugin(EWCPlugin):
    """Avalanche's EWCPlugin, timing its importance pass; optionally on fewer examples or another batch size
    (fisher_samples 0 and fisher_batch None = Avalanche's behaviour: every training example, train_mb_size)."""

    def __init__(self, *args, fisher_samples=0, fisher_batch=None, **kwargs):
      super().__init__(*args, **kwargs)
      self.fisher_samples, self.fisher_batch, self.seconds, self.examples = fisher_samples, fisher_batch, [], []

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
      t0 = time.perf_counter()
      if self.fisher_samples and self.fisher_samples < len(dataset):
        dataset = dataset.subset(torch.randperm(len(dataset))[:self.fisher_samples].tolist())
      out = super().compute_importances(model, criterion, optimizer, dataset, device,
                                        self.fisher_batch or batch_size, num_workers)
      self.seconds.append(time.perf_counter() - t0)
      self.examples.append(len(dataset))
      return out

  class FirstExperienceLR(SupervisedPlugin):
    """Learning rate `first` on the first experience, `rest` afterwards."""

    def __init__(self, first, rest):
      super().__init__()
      self.first, self.rest = first, rest

    def before_training_exp(self, strategy, **kwargs):
      lr = self.first if strategy.clock.train_exp_counter == 0 else self.rest
      for group in strategy.optimizer.param_groups:
        group['lr'] = lr

  return TimedEWCPlugin, FirstExperienceLR


def make_strategy(args, model, lr, num_train_exps):
  import torch
  from torch import nn
  from avalanche.evaluation.metrics import accuracy_metrics
  from avalanche.training import AGEM, Naive
  from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
  from avalanche.training.storage_policy import ClassBalancedBuffer, ExperienceBalancedBuffer
  TimedEWCPlugin, FirstExperienceLR = make_plugins()

  optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
  # Experience accuracy only, no loggers: the cheapest Avalanche evaluator.
  evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
  plugins, settings = [], {}
  if args.lr_first_task is not None:
    plugins.append(FirstExperienceLR(args.lr_first_task, lr))
    settings['lr_first_task'] = args.lr_first_task
  common = dict(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch,
                train_epochs=1, eval_mb_size=args.eval_mb, device='cpu', evaluator=evaluator, eval_every=-1)
  if args.strategy == 'naive':
    strategy = Naive(plugins=plugins, **common)
  elif args.strategy == 'ewc':
    decay = args.ewc_decay if args.ewc_mode == 'online' else None
    ewc = TimedEWCPlugin(args.ewc_lambda, mode=args.ewc_mode, decay_factor=decay,
                         fisher_samples=args.fisher_samples, fisher_batch=args.fisher_batch)
    strategy = Naive(plugins=plugins + [ewc], **common)  # = avalanche.training.EWC(...), which adds EWCPlugin.
    settings.update(ewc_lambda=args.ewc_lambda, mode=args.ewc_mode, decay_factor=decay,
                    fisher_samples=args.fisher_samples or 'all (Avalanche default)',
                    fisher_batch=args.fisher_batch or f'{args.batch} (train_mb_size, Avalanche default)')
  elif args.strategy == 'replay':
    size = args.mem_per_task * num_train_exps
    if args.replay_buffer == 'experience_fixed':
      policy = ExperienceBalancedBuffer(size, adaptive_size=False, num_experiences=num_train_exps)
    elif args.replay_buffer == 'class_fixed':
      policy = ClassBalancedBuffer(size, adaptive_size=False, total_num_classes=10)
    else:  # avalanche_default: what avalanche.training.Replay(mem_size=...) builds.
      size = args.mem_size or size
      policy = ExperienceBalancedBuffer(size, adaptive_size=True)
    replay = ReplayPlugin(mem_size=size, batch_size=args.batch, batch_size_mem=args.replay_batch,
                          storage_policy=policy)
    strategy = Naive(plugins=plugins + [replay], **common)
    settings.update(replay_buffer=args.replay_buffer, mem_size=size, mem_per_task=args.mem_per_task,
                    batch_size_mem=args.replay_batch, task_balanced_dataloader=False)
  elif args.strategy == 'agem':
    strategy = AGEM(patterns_per_exp=args.mem_per_task, sample_size=args.ref_batch, plugins=plugins, **common)
    settings.update(patterns_per_exp=args.mem_per_task, sample_size=args.ref_batch)
  else:
    raise ValueError(args.strategy)
  return strategy, settings


def memory_sizes(strategy):
  """Examples held in the strategy's episodic memory (replay / A-GEM), per group."""
  for p in strategy.plugins:
    if hasattr(p, 'storage_policy'):
      return [len(g.buffer) for g in p.storage_policy.buffer_groups.values()]
    if hasattr(p, 'buffers') and hasattr(p, 'patterns_per_experience'):
      return [len(b) for b in p.buffers]
  return None


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--protocol', choices=['permuted', 'split'], required=True)
  ap.add_argument('--strategy', choices=['naive', 'ewc', 'replay', 'agem'], required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--out', default=None, help='JSON file to write')
  ap.add_argument('--data', default=protocols.DEFAULT_DATA, help='folder with the four MNIST idx(.gz) files')
  ap.add_argument('--lr', type=float, default=None, help=f'default: clflax\'s published rates {LEARNING_RATES}')
  ap.add_argument('--lr-first-task', type=float, default=None,
                  help='another rate on the first task only (0.05 with replay = what clflax does on task 1, where '
                       'its memory is empty and its loss is the current batch alone at lr 0.05)')
  ap.add_argument('--init', choices=['agem_paper', 'torch'], default='agem_paper')
  ap.add_argument('--batch', type=int, default=10)
  ap.add_argument('--eval-mb', type=int, default=1000)
  ap.add_argument('--keep-last-batch', action='store_true',
                  help='train on the incomplete last batch too (Avalanche default; clflax drops it)')
  g = ap.add_argument_group('smoke / partial runs')
  g.add_argument('--train-tasks', type=int, default=0, help='train only the first k tasks (0 = all: 17 or 5)')
  g.add_argument('--eval-tasks', type=int, default=0, help='test sets evaluated after each task (0 = all: 17 or 5)')
  g.add_argument('--n-train', type=int, default=0,
                 help='training examples per task, drawn as clflax\'s examples_per_task (0 = the protocol\'s)')
  g.add_argument('--n-test', type=int, default=0, help='test examples per task (0 = the protocol\'s)')
  g = ap.add_argument_group('strategy settings (defaults: the clflax protocol\'s)')
  g.add_argument('--mem-per-task', type=int, default=250, help='replay / A-GEM memory per task')
  g.add_argument('--ref-batch', type=int, default=256, help='A-GEM sample_size')
  g.add_argument('--replay-batch', type=int, default=10, help='replay: memory examples per step (batch_size_mem)')
  g.add_argument('--replay-buffer', choices=['experience_fixed', 'class_fixed', 'avalanche_default'],
                 default='experience_fixed',
                 help='experience_fixed: 250 per task, random (closest to clflax); class_fixed: 250 * tasks / 10 '
                      'per class, each class one reservoir over all tasks; avalanche_default: Replay(mem_size) = one '
                      'budget split evenly over the tasks seen so far')
  g.add_argument('--mem-size', type=int, default=0, help='avalanche_default buffer: total size (0 = 250 * tasks)')
  g.add_argument('--ewc-lambda', type=float, default=10.0, help='penalty lambda * sum F (w - w*)^2')
  g.add_argument('--ewc-mode', choices=['online', 'separate'], default='online')
  g.add_argument('--ewc-decay', type=float, default=1.0, help='online mode: F <- decay * F + F_new')
  g.add_argument('--fisher-samples', type=int, default=0,
                 help='examples of the finished task for the Fisher (0 = all of them, Avalanche default)')
  g.add_argument('--fisher-batch', type=int, default=0,
                 help='batch of the Fisher pass (0 = train_mb_size, Avalanche default; 1 = per-example Fisher)')
  g = ap.add_argument_group('measurement')
  g.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  g.add_argument('--wait-quiet', type=float, default=None, metavar='LOAD',
                 help='first wait (up to 40 min) until the 1-minute load average is <= LOAD')
  g.add_argument('--check-eval', action='store_true', help='recompute the final accuracies with a plain torch loop')
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  command = shlex.join([sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else argv))
  lr = args.lr if args.lr is not None else LEARNING_RATES[args.strategy]

  # Known, harmless warnings of this set-up: no QP solver (only GEM needs one), no loggers (on purpose), and the
  # ReplayPlugin's own call of the deprecated storage_policy.update.
  warnings.filterwarnings('ignore', message='no QP solver found')
  warnings.filterwarnings('ignore', message='No loggers specified')
  # (Avalanche's @deprecated re-installs its own 'once' filter on every call, so that one is dropped at display.)
  show = warnings.showwarning
  warnings.showwarning = lambda message, *a, **k: (
      None if str(message).startswith('Call to deprecated function update') else show(message, *a, **k))
  import torch
  torch.set_num_threads(args.threads)
  wait = machine.wait_until_quiet(args.wait_quiet) if args.wait_quiet is not None else None
  import avalanche
  import torchvision
  from avalanche.training.determinism.rng_manager import RNGManager

  t0 = time.perf_counter()
  bm, tasks, train_ids, eval_ids, test_tensors = build_benchmark(args)
  build_s = time.perf_counter() - t0
  n_train, n_test = len(bm.train_stream[0].dataset), len(bm.test_stream[0].dataset)
  print(f'[{args.protocol}/{args.strategy}] built in {build_s:.1f}s: {len(train_ids)} train tasks x {n_train}, '
        f'{len(eval_ids)} test sets x {n_test}, lr {lr}', flush=True)

  RNGManager.set_random_seeds(args.seed)  # Python random, numpy and torch: the init, shuffles and memory draws.
  model = make_model(args.init)
  strategy, settings = make_strategy(args, model, lr, len(train_ids))
  train_kwargs = {} if args.keep_last_batch else {'drop_last': True}

  acc_matrix, per_task = [], []
  meter = machine.CpuMeter().start()
  wall0 = time.perf_counter()
  for i, exp in enumerate(bm.train_stream):
    task_meter = machine.CpuMeter().start()
    t1 = time.perf_counter()
    strategy.train(exp, **train_kwargs)
    t2 = time.perf_counter()
    res = strategy.eval(bm.test_stream)
    t3 = time.perf_counter()
    accs = [float(res[f'Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}']) for j in range(len(eval_ids))]
    acc_matrix.append(accs)
    steps = n_train // args.batch if not args.keep_last_batch else -(-n_train // args.batch)
    rec = {'task': train_ids[i], 'train_s': round(t2 - t1, 3), 'eval_s': round(t3 - t2, 3), 'steps': steps,
           'steps_per_s': round(steps / (t2 - t1), 2), 'acc_this': accs[i],
           'mean_acc_seen': float(np.mean(accs[:i + 1])),
           'memory': memory_sizes(strategy), 'loadavg': machine.loadavg(), 'cpu_busy': task_meter.read()}
    ewc = next((p for p in strategy.plugins if hasattr(p, 'fisher_samples')), None)
    if ewc is not None:
      rec['fisher_s'], rec['fisher_examples'] = round(ewc.seconds[-1], 3), ewc.examples[-1]
    per_task.append(rec)
    print(f'[{args.protocol}/{args.strategy}] task {i + 1:2d}/{len(train_ids)}: train {t2 - t1:7.1f}s '
          f'({rec["steps_per_s"]:.0f} steps/s)  eval {t3 - t2:5.1f}s  acc(this) {accs[i]:.4f}  '
          f'mean(seen) {rec["mean_acc_seen"]:.4f}  other-CPU {rec["cpu_busy"]["other"]:.2f}  '
          f'elapsed {time.perf_counter() - wall0:.0f}s', flush=True)
  wall_s = time.perf_counter() - wall0
  busy = meter.read()

  summary = protocols.continual_summary(acc_matrix)
  train_s = sum(r['train_s'] for r in per_task)
  eval_s = sum(r['eval_s'] for r in per_task)
  steps = sum(r['steps'] for r in per_task)
  final = acc_matrix[-1]
  print(f'[{args.protocol}/{args.strategy}] A_T {summary["A_T"]:.4f}  F_T {summary["F_T"]:.4f}  '
        f'wall {wall_s:.1f}s (train {train_s:.1f}s, eval {eval_s:.1f}s)  {steps / train_s:.0f} train steps/s',
        flush=True)

  check = None
  if args.check_eval:  # The same accuracies from a plain torch loop over the same tensors.
    model.eval()
    with torch.no_grad():
      check = [float((model(x).argmax(1) == y).float().mean()) for x, y in test_tensors]
    print(f'check-eval: max |plain torch - Avalanche| = {max(abs(a - b) for a, b in zip(check, final)):.2e}')

  out = {
      'library': 'avalanche-lib', 'protocol': args.protocol, 'strategy': args.strategy,
      'clflax_counterpart': f'configs/{"permuted" if args.protocol == "permuted" else "split"}_mnist.py:'
                            f'{CLFLAX_NAMES[args.strategy]}',
      'seed': args.seed, 'lr': lr, 'init': args.init, 'batch': args.batch, 'eval_mb': args.eval_mb,
      'drop_last': not args.keep_last_batch, 'settings': settings,
      'smoke': bool(args.train_tasks or args.eval_tasks or args.n_train or args.n_test),
      'n_train_per_task': n_train, 'n_test_per_task': n_test, 'train_tasks': train_ids, 'eval_tasks': eval_ids,
      'A_T': summary['A_T'], 'F_T': summary['F_T'], 'BWT': summary['BWT'],
      'final_accs': final[:len(train_ids)], 'final_accs_all_eval': final, 'acc_matrix': acc_matrix,
      'wall_s': round(wall_s, 2), 'train_s': round(train_s, 2), 'eval_s': round(eval_s, 2),
      'build_s': round(build_s, 2),
      'train_steps': steps, 'train_steps_per_s': round(steps / train_s, 2),
      'fisher_s': round(sum(r['fisher_s'] for r in per_task), 2) if args.strategy == 'ewc' else None,
      'per_task': per_task,
      'cpu_busy': busy, 'wait': wait, 'check_eval': check,
      'versions': {'avalanche': avalanche.__version__, 'torch': torch.__version__,
                   'torchvision': torchvision.__version__, 'numpy': np.__version__,
                   'python': platform.python_version()},
      'machine': {'cpu_model': machine.cpu_model(), 'cpu_count': os.cpu_count(),
                  'torch_threads': torch.get_num_threads(),
                  'torch_interop_threads': torch.get_num_interop_threads(), 'platform': platform.platform()},
      'timing': 'train = strategy.train(exp) (includes end-of-task plugin work: EWC importances (also in fisher_s), '
                'memory updates); '
                'eval = strategy.eval(test_stream); wall = the task loop (data building excluded: build_s)',
      'command': command, 'cwd': os.getcwd(),
  }
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
    print('wrote', args.out, flush=True)
  return out


if __name__ == '__main__':
  main()
