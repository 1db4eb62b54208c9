"""The classic MNIST protocols as configs: Permuted (the A-GEM paper's), Rotated and Split MNIST.

`permuted(arg)` is the A-GEM paper's Permuted-MNIST protocol (Chaudhry et al., ICLR 2019): 20 pixel permutations;
the first 3 tasks are for tuning only, the other 17 are learned in sequence, each one epoch over the 55,000 training
images left after the 5,000-image validation split, batch 10, plain SGD; MLP 784-256-256-10 (ReLU, one shared head,
the authors' init); episodic memory 250 examples per task (25 per class); A-GEM reference batch 256; each task tested
on its full permuted 10,000-image test set. `arg` picks the strategy and its published learning rate (`PUBLISHED`),
joins several with '+' (e.g. 'agem+replay'), and ',smoke' makes a few-hundred-example, 3-task version (seconds).
`rotated(arg)` replaces each permutation by a rotation; `split(arg)` makes 5 tasks of 2 digits (',multi_head':
task-incremental). The experiment files in the repository's configs/ call these; a config of your own can too.
"""
import ml_collections

from clflax.configs import default

# Per strategy: (learning rate, {strategy field: value}) from the paper's hyper-parameter search.
PUBLISHED = {
    'vanilla': (0.03, {}),
    'ewc': (0.03, {'ewc.strength': 20.0}),  # Paper lambda 10 on sum F (w - w*)^2 = strength 20 on 0.5 * sum.
    'ewc_running': (0.03, {'ewc.strength': 20.0, 'ewc.fisher': 'running', 'ewc.decay': 0.0}),
    'mas': (0.1, {'mas.strength': 0.2}),  # lambda 0.1 likewise doubled for the 0.5 * sum form.
    # SI: Omega grows every task, and SGD at lr 0.1 diverged at task 5 (seed 0) once 0.1 * 0.2 * max Omega passed 2
    # (max Omega 110 after 4 tasks); the cap 1 / lr = 10 on the stiffness keeps every step stable (strategies/si.py).
    'si': (0.1, {'si.strength': 0.2, 'si.max_stiffness': 10.0}),
    'agem': (0.1, {}),
    # ER with lr 0.1 on 10 current + 10 memory examples averaged together = loss_cur + loss_mem at lr 0.05.
    'replay': (0.05, {}),
    # ER-ACE: ER's memory and rate, its incoming loss over the classes present in the batch (and unseen ones).
    'erace': (0.05, {}),
    'joint': (0.03, {'classic.joint': True}),  # Not continual: VAN's rate on the union of the tasks.
    # GEM: lr 0.1 (the A-GEM paper's GEM / A-GEM rate); margin (memory_strength) 0.5 and 256 memories per task are the
    # GEM authors' MNIST settings (run_experiments.sh); 250 here, the A-GEM protocol's memory.
    'gem': (0.1, {'gem.margin': 0.5}),
    # DER / DER++: alpha 1.0 and beta 0.5 are the DER authors' best Permuted-MNIST values (mammoth utils/best_args.py,
    # buffer 500); their lr 0.2 was for batch 128 and one reservoir buffer: 0.1 is this protocol's memory-method rate
    # with batch 10 (assumed, not tuned here).
    'der': (0.1, {'der.alpha': 1.0, 'der.beta': 0.0}),
    'derpp': (0.1, {'der.alpha': 1.0, 'der.beta': 0.5}),
    # TA-A-GEM: A-GEM's rate; its memory is filled online, one example per step, never told where tasks change.
    'tagem': (0.1, {}),
    # PackNet (task-incremental: each task is tested with its own weights): VAN's rate; 80% of each task's weights
    # per layer freed for later tasks (the 17th task still gets 0.8^16 = 2.8% of the weights), one retraining epoch.
    'packnet': (0.03, {'packnet.prune_fraction': 0.8, 'packnet.retrain_epochs': 1}),
    # MER: inner SGD at A-GEM's rate, 5 Reptile batches of (incoming batch, one memory batch of 10), beta 0.1,
    # gamma 1 (assumed, not tuned: the MER paper's MNIST protocol differs from this one).
    'mer': (0.1, {'mer.batches': 5, 'mer.steps': 2, 'mer.beta': 0.1, 'mer.gamma': 1.0}),
    # Progressive Networks: a new 784-256-256-10 column per task with lateral adapters from the frozen earlier ones
    # (task-aware at test time, parameters grow with every task); VAN's rate.
    'progressive': (0.03, {}),
}
STRATEGY_NAMES = {'vanilla': 'naive', 'ewc_running': 'ewc', 'joint': 'naive', 'derpp': 'der'}


def permuted(arg='agem'):
  """The A-GEM paper's Permuted-MNIST protocol; `arg` = strategy[+strategy...][,smoke] (see the module doc)."""
  parts = (arg or 'agem').split(',')
  smoke = 'smoke' in parts[1:]
  chosen = parts[0].split('+')
  unknown = [c for c in chosen if c not in PUBLISHED]
  if unknown:
    raise ValueError(f'unknown strategy {unknown[0]!r} for permuted_mnist; known: {", ".join(PUBLISHED)}')
  config = default.get_config()
  config.data.mnist = 'mnist'
  config.classic = ml_collections.ConfigDict()
  config.classic.protocol = 'permuted'  # 'permuted', 'rotated' or 'split'.
  config.classic.num_tasks = 20  # Tasks generated (permutations).
  config.classic.skip_tasks = 3  # Leading tasks used only for hyper-parameter tuning (not trained here).
  config.classic.examples_per_task = 0  # Training examples per task; 0 = all 55,000.
  config.classic.test_examples_per_task = 0  # Test examples per task; 0 = all 10,000.
  config.classic.num_validation = 5000  # Training images held out as validation (the authors' split).
  config.classic.classes_per_task = 10  # Digits per task (split MNIST: 2).
  config.classic.multi_head = False  # One head per task (task-incremental split MNIST).
  config.classic.joint = False  # Multi-task upper bound: every stage trains on all tasks mixed (not continual).
  config.model.backbone = 'mlp'  # The classic MLP instead of the EfficientNet multi-task net.
  config.model.hidden = (256, 256)  # Hidden widths.
  config.model.init = 'agem_paper'  # Truncated normal std 0.1 weights, 0.1 biases (the authors' init).
  config.model.pretrained = ''  # Trained from scratch, as in the paper.
  config.model.frozen_bn, config.train.backbone_lr_scale = False, 1.0  # (Vision recipe options; the MLP has neither.)
  config.tasks = tuple(f'task{i + 1}' for i in range(config.classic.skip_tasks, config.classic.num_tasks))
  train = config.train
  train.batch_size, train.eval_batch_size = 10, 1000
  train.epochs = ml_collections.ConfigDict({t: 1 for t in config.tasks})
  train.loss_weights = ml_collections.ConfigDict({t: 1.0 for t in config.tasks})
  train.optimizer, train.momentum, train.weight_decay = 'sgd', 0.0, 0.0
  train.learning_rate = PUBLISHED[chosen[0]][0]  # A composition takes the first strategy's rate.
  train.warmup_steps, train.restart_epochs, train.clip_norm, train.label_smoothing = 0, 1000, 0.0, 0.0
  train.constant_learning_rate = True
  train.flatten_optimizer = False  # 6 leaves: nothing to gain, and the ravel would dominate the 0.4 ms step.
  train.log_every_steps, train.checkpoint_every_steps = 5500, 100000
  config.strategy.names = tuple(dict.fromkeys(STRATEGY_NAMES.get(c, c) for c in chosen))
  for c in chosen:
    for field, value in PUBLISHED[c][1].items():
      section, name = field.split('.')
      (config if section == 'classic' else config.strategy)[section][name] = value
  config.strategy.agem.memory_per_task, config.strategy.agem.ref_batch = 250, 256
  config.strategy.replay.memory_per_task, config.strategy.replay.batch = 250, 10
  config.strategy.erace.memory_per_task, config.strategy.erace.batch = 250, 10  # As ER.
  config.strategy.gem.memory_per_task, config.strategy.gem.ref_batch_per_task = 250, 250  # GEM: the whole memory.
  config.strategy.mer.memory_per_task = 250
  config.strategy.der.memory_per_task, config.strategy.der.batch = 250, 10  # As ER: 10 memory examples per term.
  # TA-A-GEM: 10 label pools of 17 clusters x 25 = A-GEM's final 4,250-example budget; A-GEM's reference batch.
  config.strategy.tagem.clusters, config.strategy.tagem.per_cluster, config.strategy.tagem.ref_batch = 17, 25, 256
  config.strategy.ewc.fisher_samples = 1000  # Exact Fisher: per-example gradients of 1,000 training images.
  config.strategy.mas.samples = 1000
  if smoke:
    config.classic.num_tasks, config.classic.skip_tasks = 4, 1
    config.classic.examples_per_task, config.classic.test_examples_per_task = 500, 500
    config.classic.num_validation = 0
    config.tasks = tuple(f'task{i + 1}' for i in range(1, 4))
    train.epochs = ml_collections.ConfigDict({t: 1 for t in config.tasks})
    train.loss_weights = ml_collections.ConfigDict({t: 1.0 for t in config.tasks})
    train.eval_batch_size = 250
    config.strategy.agem.memory_per_task = config.strategy.replay.memory_per_task = 50
    config.strategy.erace.memory_per_task = 50
    config.strategy.agem.ref_batch = 50
    config.strategy.gem.memory_per_task = config.strategy.gem.ref_batch_per_task = 50
    config.strategy.der.memory_per_task = config.strategy.mer.memory_per_task = 50
    config.strategy.tagem.clusters, config.strategy.tagem.per_cluster, config.strategy.tagem.ref_batch = 3, 5, 50
    config.strategy.ewc.fisher_samples = config.strategy.mas.samples = 100
  return config


def rotated(arg='agem'):
  """Rotated MNIST: `permuted(arg)` with each task a fixed rotation (20 angles over [0, 180)) instead."""
  config = permuted(arg)
  config.classic.protocol = 'rotated'  # Task t rotates every digit by its own angle.
  return config


def split(arg='agem'):
  """Split MNIST: 5 tasks of 2 digits (0/1, ..., 8/9), all learned; ',multi_head' = task-incremental 2-way heads."""
  parts = (arg or 'agem').split(',')
  multi_head = 'multi_head' in parts
  config = permuted(','.join(p for p in parts if p != 'multi_head'))
  smoke = 'smoke' in parts
  c = config.classic
  c.protocol = 'split'  # Task t holds digits 2t and 2t + 1.
  c.num_tasks, c.skip_tasks = 5, 0  # Every task is learned (no tuning tasks in this protocol).
  c.classes_per_task = 2  # Digits per task.
  c.multi_head = multi_head  # True: task-incremental (2-way head per task); False: one 10-way head.
  c.examples_per_task = c.test_examples_per_task = 200 if smoke else 0  # 0 = every image of the task's digits.
  config.tasks = tuple(f'task{i + 1}' for i in range(c.num_tasks))
  config.train.epochs = ml_collections.ConfigDict({t: 1 for t in config.tasks})
  config.train.loss_weights = ml_collections.ConfigDict({t: 1.0 for t in config.tasks})
  return config
