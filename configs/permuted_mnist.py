r"""The A-GEM paper's Permuted-MNIST protocol (Chaudhry et al., ICLR 2019), through the same trainer as the vision run.

20 pixel permutations; the first 3 tasks are for tuning only, the other 17 are learned in sequence, each one epoch
over the 55,000 training images left after the 5,000-image validation split, batch 10, plain SGD; MLP 784-256-256-10
(ReLU, one shared head, the authors' init); episodic memory 250 examples per task (25 per class); A-GEM reference
batch 256; each task tested on its full permuted 10,000-image test set. The arg picks the strategy and its
published learning rate:
  vanilla (0.03); ewc (0.03, lambda 10, exact per-example Fisher accumulated over tasks); ewc_running (the authors'
  estimator: running average of squared mini-batch gradients, replaced each task, scaled to [0, 1]); mas (0.1,
  lambda 0.1); si (0.1, lambda 0.1); agem (0.1); replay (ER: 10 current + 10 memory examples averaged, lr 0.1);
  gem (0.1, margin 0.5, each earlier task's gradient on its whole 250-example memory every step); der / derpp (0.1;
  DER: MSE to the logits stored at the end of each task, alpha 1.0; DER++ adds the memory labels' loss, beta 0.5;
  10 memory examples per term and step); tagem (0.1: task-agnostic A-GEM, its clustering memory of 10 label pools x
  17 clusters x 25 filled online with one example per step, no task boundaries used); packnet (0.03; prunes 80% of
  each task's weights per layer after its epoch, retrains one epoch, tests each task with its own weights, i.e. it
  is told the task at test time, unlike the others); mer (0.1, inner SGD: 5 Reptile batches of the incoming batch
  and one memory batch of 10, beta 0.1, gamma 1); progressive (0.03: a Progressive Network, one MLP column per task
  with lateral adapters, each task tested through its own column); joint (0.03: the multi-task upper bound, every
  stage's batches drawn from all 17 tasks, so the 17 stages make one epoch over their union); compositions joined by
  '+', e.g. agem+replay or replay+der (94.70 +- 0.07 over 5 seeds, the best continual row).
Append ',smoke' for a few-hundred-example, 3-task version (seconds).

Runtime on 2 CPU cores (17 tasks, evaluation of every task after every stage included): vanilla / EWC / MAS / SI
about 1-2 min (the epochs run at ~2,800 steps/s); A-GEM about 7 min (its 256-example reference gradient every step:
~240 steps/s); GEM is the costliest: one gradient per earlier task on all its 250 memory examples every step (16 x
250 examples at the last task); measured on shared cores 35 steps/s with one earlier task down to 9 steps/s with
16, so ~1.5-2 h. --config.strategy.gem.ref_batch_per_task=64 samples 64 per task instead (cheaper, noisier
constraints; stopped after 13 of 17 tasks at ~55 min on shared cores). Also measured on shared cores: replay+der
~6 min, packnet ~5 min, derpp ~11 min, mer ~18 min (10 inner SGD steps per step), tagem ~6.5 min (~250 steps/s,
A-GEM's step cost) and progressive ~15 min (only the trained column is updated, but every earlier column runs
forward: ~1,600 steps/s on the first column, ~90 on the 17th). Fewer tasks: --config.classic.num_tasks=6 (3 trained
tasks).
Command (needs the four MNIST idx files in <data_dir>/mnist; the bundled sample has a 2,000-image subset only):
  python launch.py --config configs/permuted_mnist.py:agem --config.data_dir=../shared/data
"""
from clflax.configs import mnist


def get_config(arg='agem'):
  return mnist.permuted(arg)
