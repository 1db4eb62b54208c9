"""What is fixed for a whole run (`Run`: model, data, mesh, writers, compiled programs) and how it is built.

`stage_program(run, k, task)` is the compiled train step of stage k (or, with on-device epochs, its compiled
epoch), compiled once ahead of its first call and timed; stages whose programs are the same share one.
"""
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from clu import metric_writers

from clflax import tasks
from clflax.data import classic as classic_data
from clflax.data import inputs
from clflax.data import pipeline
from clflax.models import classic as classic_models
from clflax.models import multitask
from clflax.models import pretrained
from clflax.reporting import console
from clflax.reporting import tracking
from clflax.strategies import registry
from clflax.trainer import consolidate as consolidation
from clflax.trainer import evaluation
from clflax.trainer import optim
from clflax.trainer import parallel
from clflax.trainer import steps
from clflax.trainer.state import Context
from clflax.trainer.state import TrainTree


class Run(NamedTuple):
  """Everything fixed for the whole run (no arrays that change during training)."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any  # multitask.MultiTaskNet, or a classic-protocol model (models/classic.py).
  strategies: tuple  # The active Strategy values, in chain order.
  data: inputs.Data
  writer: Any  # clu MetricWriter: TensorBoard events (+ MLflow when configured).
  mesh: Any
  eval_steps: dict  # task -> jitted eval step.
  param_counts: dict  # Parameter counts: 'total' and per part.
  examples_per_task: int  # Training examples of a finished task drawn for memories and consolidation.
  stage_steps: tuple  # Planned train steps of each stage (early stopping may end one sooner).
  progress_line: console.RunProgress
  hooks: tuple  # Callables called with the name of each point the run reaches (trainer/hooks.py).
  programs: dict  # Compiled stage programs, shared by stages that compile to the same one.
  # All tasks' evaluation in one compiled call (evaluation.DeviceEvaluation), where the data lives on the device
  # and every task is evaluated with the same variables and model; else None.
  device_eval: Any = None

  def shard(self, local_batch):
    """A training batch: this process's part of the global batch, split over its devices."""
    return parallel.shard_batch(self.mesh, local_batch)

  def shard_eval(self, whole_batch):
    """An evaluation batch, which every process holds whole: split over all devices of all processes."""
    return parallel.shard_whole_batch(self.mesh, whole_batch)

  def close(self):
    self.writer.close()


def call_hooks(run: Run, point: str) -> None:
  for hook in run.hooks:
    hook(point)


def is_classic(config: ml_collections.ConfigDict) -> bool:
  return config.model.backbone == 'mlp'


def build_model(config: ml_collections.ConfigDict):
  """The run's model: the multi-task EfficientNet, or the classic protocols' MLP; a strategy may replace it."""
  if is_classic(config):
    model = classic_models.build_model(config)
  else:
    model = multitask.MultiTaskNet(
        backbone=config.model.backbone, num_cls_classes=inputs.NUM_CLS_CLASSES,
        neck_channels=config.model.neck_channels, depthwise=config.model.depthwise, dropout=config.model.dropout,
        max_detections=config.model.max_detections, frozen_bn=config.model.frozen_bn,
        det_image_head=config.model.det_image_head, shared_neck=config.model.shared_neck,
        dtype=jnp.dtype(config.model.dtype))
  for s in registry.resolve(config.strategy.names):
    if s.model is not None:
      model = s.model(registry.section(config.strategy, s), config, model)
  return model


def imagenet_head_classes(config: ml_collections.ConfigDict, data: inputs.Data):
  """The classification classes' WordNet ids when the cls head starts from the ImageNet classifier, else None."""
  mode = config.model.cls_head_init
  ids = (data.class_ids or {}).get('cls', ())
  known = set(pretrained.imagenet_wnids()) if mode != 'random' and config.model.pretrained else set()
  usable = bool(ids) and set(ids) <= known
  if mode == 'imagenet' and 'cls' in config.tasks and not usable:
    raise ValueError(f"config.model.cls_head_init='imagenet': the classification classes {list(ids)[:3]} are not "
                     "ImageNet WordNet ids (use 'random' or 'auto')")
  if mode == 'random' or not usable:
    return None
  logging.info('cls head: the ImageNet classifier rows of its %d classes (model.cls_head_init=%s)', len(ids), mode)
  return ids


def _init_variables(config, model, data):
  with jax.default_prng_impl('rbg'):  # Compiles several times faster than threefry for the many initialisers.
    key = jax.random.PRNGKey(config.seed)
    if is_classic(config):
      example = data.example_batches[config.tasks[0]]
      heads = {'head': jnp.asarray(example['head'][:1])} if 'head' in example else {}  # Multi-head MLPs.
      # Jitted: op-by-op, the initialisers alone compiled for 1.5 s.
      return dict(jax.jit(model.init)(key, jnp.asarray(example['image'][:1]), **heads), batch_stats={})
    return multitask.init_variables(model, key, config.model.image_size,
                                    pretrained_path=config.model.pretrained or None,
                                    cls_wnids=imagenet_head_classes(config, data))


def setup_run(config: ml_collections.ConfigDict, workdir: str, hooks: tuple = (),
              data: inputs.Data | None = None) -> tuple[Run, TrainTree]:
  """Builds the model, data (unless given), mesh and writers; returns the run and the initial array tree."""
  strategies = registry.resolve(config.strategy.names)
  model = build_model(config)
  if data is None:
    data = classic_data.load_data(config) if is_classic(config) else pipeline.trainer_data(config)
  logging.info('data: %s', data.description)
  mesh = parallel.make_mesh()
  variables = _init_variables(config, model, data)
  counts = multitask.count_params(variables)
  first = config.tasks[0]
  tx = optim.make_tx(config, data.steps_per_epoch[first], data.example_batches[first], stage=0, task=first)
  state = optim.initial_state(config, variables, tx)
  teacher = parallel.copy_tree(variables) if registry.needs(config.strategy).teacher else {}
  if config.train.joint:  # Every task's whole training set, from the start.
    memories = consolidation.joint_memories(data, config.tasks)
  else:  # Classic protocols: one memory for all tasks (same head, same example shapes); else one per task.
    memories = consolidation.initial_memories(config, model, variables, data.example_batches, is_classic(config))
  tree = parallel.replicate(mesh, TrainTree(state, Context(memories, teacher), parallel.copy_tree(variables)))
  writers = [metric_writers.SummaryWriter(workdir)] if jax.process_index() == 0 else []
  writer = tracking.make_writer(config, workdir, metric_writers.MultiWriter(writers))
  eval_steps = {t: steps.jit_eval_step(model, t, config.model.max_detections, parallel.replicated(mesh))
                for t in config.tasks}
  stage_steps = tuple(config.train.epochs[t] * data.steps_per_epoch[t] for t in config.tasks)
  evaluations = 2 * len(config.tasks) + sum(config.train.epochs[t] for t in config.tasks)
  shared = data.scan is not None and not any(s.stage_program for s in strategies)  # One epoch program per head.
  programs = len({tasks.kind(t) for t in config.tasks}) if shared else len(config.tasks)
  progress_line = console.RunProgress(stage_steps=stage_steps, kinds=[tasks.kind(t) for t in config.tasks],
                                      evaluations=evaluations, programs=programs)
  run = Run(config, workdir, model, strategies, data, writer, mesh, eval_steps, counts,
            consolidation.examples_per_task(config), stage_steps, progress_line, hooks, {},
            device_evaluation(config, model, strategies, data, hooks))
  return run, tree


def device_evaluation(config, model, strategies, data: inputs.Data, hooks: tuple = ()):
  """The one-call evaluation of all tasks when the data provides it and no strategy evaluates a task with its own
  weights (`eval_params`) or model (`model`, whose heads depend on the task); else None (per-task eval steps)."""
  if data.device_eval is None or any(s.eval_params is not None or s.model is not None for s in strategies):
    return None
  source, batch_fn, num_batches, task_ids = data.device_eval
  program = steps.jit_device_evaluation(model, config.tasks[0], config.model.max_detections, batch_fn, num_batches)
  return evaluation.device_evaluation(program, source, task_ids, hooks)


class _Compiled:
  """A jitted program compiled ahead of its first call (timed, one console line), then called as compiled."""

  def __init__(self, run: Run, jitted: Callable, label: str):
    self._run, self._jitted, self._label, self._compiled = run, jitted, label, None

  def __call__(self, *args):
    if self._compiled is None:
      start = time.perf_counter()
      with self._run.progress_line.timed('compile'):
        self._compiled = self._jitted.lower(*args).compile()
      seconds = time.perf_counter() - start
      self._run.progress_line.compiled(seconds)
      logging.info('compiled %s in %.1f s', self._label, seconds)
    return self._compiled(*args)


def stage_program(run: Run, k: int, task: str):
  """The compiled step (or on-device epoch) of stage k, built once and shared by stages with the same program."""
  config, steps_per_epoch = run.config, run.data.steps_per_epoch[task]
  per_stage = any(s.stage_program for s in run.strategies)
  names = '+'.join(config.strategy.names)
  if run.data.scan is None:
    key = ('step', k)
    if key not in run.programs:
      tx = optim.make_tx(config, steps_per_epoch, run.data.example_batches[task], stage=k, task=task)
      earlier = tuple(t for t in config.tasks if t != task) if config.train.joint else config.tasks[:k]
      jitted = steps.jit_train_step(run.model, tx, task, earlier, config, parallel.replicated(run.mesh),
                                    parallel.batch_sharding(run.mesh))
      run.programs[key] = _Compiled(run, jitted, f'the {task} train step ({names}; stage {k + 1})')
    return run.programs[key]
  # On-device epochs (classic protocols): every stage has the same shapes and one shared memory, so one compiled
  # epoch serves all stages, unless a strategy's transform differs per stage.
  key = ('epoch', task if per_stage else tasks.kind(task), steps_per_epoch)
  if key not in run.programs:
    tx = optim.make_tx(config, steps_per_epoch, run.data.example_batches[task], stage=k, task=task)
    jitted = steps.jit_scan_epoch(run.model, tx, task, (), config, run.data.scan[1], steps_per_epoch)
    label = f'the {steps_per_epoch}-step epoch ({names}' + (f'; stage {k + 1})' if per_stage else ')')
    run.programs[key] = _Compiled(run, jitted, label)
  return run.programs[key]
