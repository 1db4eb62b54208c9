"""Config validation: every mistake is reported in one line before any data is read or anything compiles."""
import os

import jax
import ml_collections

from clflax.strategies import registry

VISION_TASKS = ('seg', 'det', 'cls')
OPTIMIZERS = ('adamw', 'adam', 'sgd')
BACKBONES = tuple(f'b{i}' for i in range(8)) + tuple(f'lite{i}' for i in range(5)) + ('tiny', 'mlp')


def sync_classic_tasks(config: ml_collections.ConfigDict) -> None:
  """Classic protocols: makes config.tasks (and the per-task epochs / loss weights) follow `classic.num_tasks` and
  `classic.skip_tasks`, so `--config.classic.num_tasks=6` works on the command line. Per-task values must be uniform
  to be carried over; a mix is refused in one line."""
  classic = config.get('classic')
  if not classic:
    return
  wanted = tuple(f'task{i + 1}' for i in range(classic.skip_tasks, classic.num_tasks))
  _require(len(wanted) > 0, f'config.classic.num_tasks={classic.num_tasks} leaves no task after '
                            f'skip_tasks={classic.skip_tasks}')
  if tuple(config.tasks) == wanted:
    return
  with config.unlocked():
    config.tasks = wanted
    for name in ('epochs', 'loss_weights'):
      values = set(config.train[name].values())
      _require(len(values) == 1, f'config.train.{name} differs between tasks; cannot resize it to {len(wanted)} '
                                 'tasks (set config.classic.num_tasks in the config file instead)')
      value = values.pop()
      config.train[name] = ml_collections.ConfigDict({t: value for t in wanted})


def _require(condition, message):
  if not condition:
    raise ValueError(f'invalid config: {message}')


def validate(config: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1) -> None:
  """Raises ValueError naming the first invalid field of `config` (`num_devices` in all, over `num_processes`)."""
  tasks = tuple(config.tasks)
  _require(len(tasks) > 0, 'config.tasks is empty')
  _require(len(set(tasks)) == len(tasks), f'config.tasks has duplicates: {tasks}')
  classic = config.model.backbone == 'mlp'
  # Their data lives on one process's devices (whole epochs compiled on device): nothing to gain from more.
  _require(not classic or num_processes == 1,
           f'the classic MNIST protocols run in one process, not {num_processes}: drop config.distributed')
  _require(config.train.batch_size % num_processes == 0,
           f'config.train.batch_size={config.train.batch_size} is not divisible by the {num_processes} processes')
  for task in tasks:
    _require(classic or task in VISION_TASKS,
             f'unknown task {task!r} in config.tasks; known: {", ".join(VISION_TASKS)}')
    _require(task in config.train.epochs, f'config.train.epochs has no entry for task {task!r}')
    _require(config.train.epochs[task] >= 0, f'config.train.epochs.{task} must be >= 0')
    _require(task in config.train.loss_weights, f'config.train.loss_weights has no entry for task {task!r}')
  if config.data_dir:
    _require(os.path.isdir(os.path.expanduser(config.data_dir)),
             f'config.data_dir={config.data_dir!r} is not a directory')
  _require(config.model.backbone in BACKBONES,
           f'unknown backbone {config.model.backbone!r}; known: {", ".join(BACKBONES)}')
  pretrained = config.model.pretrained
  if pretrained not in ('', 'default'):
    _require(os.path.isfile(os.path.expanduser(pretrained)), f'config.model.pretrained={pretrained!r}: no such file')
  _require(config.model.image_size >= 32 and config.model.image_size % 32 == 0,
           f'config.model.image_size={config.model.image_size} must be a positive multiple of 32')
  head_init = config.model.cls_head_init
  _require(head_init in ('auto', 'imagenet', 'random'),
           f"config.model.cls_head_init={head_init!r}; expected 'auto', 'imagenet' or 'random'")
  _require(head_init != 'imagenet' or classic or config.model.pretrained,
           "config.model.cls_head_init='imagenet' needs the pretrained backbone (config.model.pretrained)")
  for name in ('read_threads', 'prefetch'):
    value = config.data.get(name, 0)
    _require(isinstance(value, int) and value >= 0, f'config.data.{name}={value!r} must be an int >= 0')
  _require(config.model.dtype in ('float32', 'bfloat16'),
           f"config.model.dtype={config.model.dtype!r}; expected 'float32' or 'bfloat16'")
  _require(config.model.depthwise in ('auto', 'shifted', 'xla'),
           f"config.model.depthwise={config.model.depthwise!r}; expected 'auto', 'shifted' or 'xla'")
  train = config.train
  for name in ('batch_size', 'eval_batch_size'):
    value = train[name]
    _require(value > 0, f'config.train.{name}={value} must be > 0')
    _require(value % num_devices == 0,
             f'config.train.{name}={value} is not divisible by the {num_devices} devices in use')
  _require(train.optimizer in OPTIMIZERS, f'unknown optimizer {train.optimizer!r}; known: {", ".join(OPTIMIZERS)}')
  _require(train.learning_rate > 0, f'config.train.learning_rate={train.learning_rate} must be > 0')
  for name in ('weight_decay', 'warmup_steps', 'clip_norm', 'label_smoothing', 'steps_per_epoch',
               'balance_finetune_steps', 'balance_memory_per_task', 'dice_weight', 'size_weight',
               'offset_weight'):
    _require(train[name] >= 0, f'config.train.{name}={train[name]} must be >= 0')
  _require(train.label_smoothing < 1, 'config.train.label_smoothing must be < 1')
  _require(train.backbone_lr_scale > 0, 'config.train.backbone_lr_scale must be > 0')
  _require(train.restart_epochs > 0, 'config.train.restart_epochs must be > 0')
  _require(train.early_stopping_patience > 0, 'config.train.early_stopping_patience must be > 0')
  _require(train.checkpoint_every_steps > 0, 'config.train.checkpoint_every_steps must be > 0')
  _require(config.data.max_boxes > 0, 'config.data.max_boxes must be > 0')
  if train.joint:
    _require(not classic, 'config.train.joint is for the vision stages; the classic protocols use config.classic.joint')
    _require(tuple(config.strategy.names) == ('naive',),
             f'config.train.joint trains every task at once, so no strategy applies: set strategy.names to naive, '
             f'not {tuple(config.strategy.names)}')
  registry.validate(config.strategy, config)


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """Reads and converts `config.model.pretrained` now, so a missing, truncated or wrong-architecture weights file
  fails in one line before any data is read or anything compiles."""
  if not config.model.pretrained or config.model.backbone == 'mlp':  # The MLP has no pretrained weights.
    return
  from clflax.models import pretrained  # pylint: disable=g-import-not-at-top  (pulls in the model code)
  path = None if config.model.pretrained == 'default' else config.model.pretrained
  pretrained.backbone_variables(config.model.backbone, path, depthwise=config.model.depthwise)
