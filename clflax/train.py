"""The continual trainer: stages (one per task), evaluation of every task after each, consolidation, snapshots.

`train_and_evaluate(config, workdir)` is the whole job; rerunning it on the same workdir resumes from the newest
complete checkpoint. Each stage compiles its head's train step once (`steps.jit_train_step`) and feeds it batches
indexed by step, so a resumed run sees exactly the batches an uninterrupted one would.
"""
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clu import metric_writers

from clflax import checkpoints
from clflax import classic
from clflax import consolidate as consolidation
from clflax import evaluation
from clflax import inputs
from clflax import optim
from clflax import parallel
from clflax import steps
from clflax import tasks
from clflax import tracking
from clflax.models import multitask
from clflax.models import pretrained
from clflax.strategies import packnet
from clflax.strategies import registry


class Run(NamedTuple):
  """Everything fixed for the whole run (no arrays that change during training)."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any  # multitask.MultiTaskNet, or classic.ClassicNet for the MNIST protocols.
  data: inputs.Data
  writer: Any  # clu metric writer (TensorBoard + log).
  mesh: Any
  eval_steps: dict  # task -> jitted eval step.
  param_count: int
  param_report: dict
  final_variables: Callable[[], dict]  # The variables after the last stage (for timing).
  compiled: dict  # Stage functions shared by stages that compile to the same program (classic benchmarks).

  def shard(self, local_batch):
    return parallel.shard_batch(self.mesh, local_batch)


def build_model(config: ml_collections.ConfigDict):
  if config.model.backbone == 'mlp':
    return classic.build_model(config)
  return multitask.MultiTaskNet(
      backbone=config.model.backbone, num_cls_classes=inputs.NUM_CLS_CLASSES, neck_channels=config.model.neck_channels,
      depthwise=config.model.depthwise, dropout=config.model.dropout, max_detections=config.model.max_detections,
      frozen_bn=config.model.get('frozen_bn', False), det_image_head=config.model.get('det_image_head', False),
      shared_neck=config.model.get('shared_neck', True))


def _log_progress(stage_label, epoch, epochs, done, total, start_time, last, writer, global_step):
  """One console line with the latest losses, speed and ETA; TensorBoard scalars via the clu writer."""
  rate = done / max(time.time() - start_time, 1e-9)
  eta = int((total - done) / max(rate, 1e-9))
  losses = ' '.join(f'{k}={v:.4g}' for k, v in sorted(last.items()))
  logging.info('%s epoch %d/%d step %d/%d | %s | %.2f steps/s, stage ETA %dm%02ds', stage_label, epoch + 1, epochs,
               done, total, losses, rate, eta // 60, eta % 60)
  writer.write_scalars(global_step, {f'train/{k}': v for k, v in last.items()})


def _check_finite(records, stage_label, first_step):
  """The NaN guard: stops the run (before any checkpoint of the bad state) naming the stage, step and loss."""
  for offset, record in enumerate(records):
    bad = [k for k, v in record.items() if not np.isfinite(v)]
    if bad:
      raise FloatingPointError(
          f'non-finite {", ".join(sorted(bad))} at {stage_label}, step {first_step + offset}; the last good '
          'checkpoint is kept. Lower the learning rate or enable clipping (config.train.clip_norm).')


def _variables(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _eval_variables(run: Run, state):
  """What each task is evaluated with: the model, or with PackNet task -> that task's weights (tasks <= it)."""
  variables = _variables(state)
  if 'packnet' not in run.config.strategy.names:
    return variables
  owners = registry.find_state(state.opt_state, packnet.PackNetState).owners
  index = {t: i for i, t in enumerate(run.config.tasks)}
  return lambda task: dict(variables, params=packnet.task_params(variables['params'], owners, index[task]))


def _prune_and_retrain(run: Run, k: int, tree: dict) -> dict:
  """PackNet after stage k: frees the `prune_fraction` smallest of the task's weights per layer (zeroed), then
  retrains the kept ones for `retrain_epochs` epochs (fresh shuffles; no validation or early stopping)."""
  config, task = run.config, run.config.tasks[k]
  cfg, state = config.strategy.packnet, tree['state']
  owners = registry.find_state(state.opt_state, packnet.PackNetState).owners
  params, owners = packnet.prune(state.params, owners, k, cfg.prune_fraction)
  opt_state = registry.replace_state(state.opt_state, packnet.PackNetState, lambda s: s._replace(owners=owners))
  state = parallel.copy_tree(parallel.replicate(run.mesh, state._replace(params=params, opt_state=opt_state)))
  _, stage_fn = _stage_functions(run, k, task)
  epochs, steps_per_epoch = config.train.epochs[task], run.data.steps_per_epoch[task]
  for epoch in range(epochs, epochs + cfg.retrain_epochs):
    if run.data.scan is not None:
      pool, _, ids = run.data.scan
      state, _ = stage_fn(state, tree['context'], pool, ids[task], epoch)
    else:
      for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
        state, _ = stage_fn(state, run.shard(run.data.train_sets[task][step]), tree['context'])
  logging.info('stage %d (%s): packnet pruned %.0f%% of its weights per layer, retrained %d epoch(s)', k + 1, task,
               100 * cfg.prune_fraction, cfg.retrain_epochs)
  return dict(tree, state=state)


def _stage_functions(run: Run, k: int, task: str):
  """(tx, compiled step or epoch function) of stage k. With on-device epochs (classic benchmarks) every stage has
  the same shapes and one shared memory, so one compiled epoch serves all stages."""
  config, steps_per_epoch = run.config, run.data.steps_per_epoch[task]
  if run.data.scan is None:
    tx = optim.make_tx(config, steps_per_epoch, run.data.example_batches[task], stage=k)
    earlier = tuple(t for t in config.tasks if t != task) if config.train.get('joint') else config.tasks[:k]
    return tx, steps.jit_train_step(run.model, tx, task, earlier, config, parallel.replicated(run.mesh),
                                    parallel.batch_sharding(run.mesh))
  # Progressive Networks run a different column, i.e. a different program, per stage.
  key = (task if 'progressive' in config.strategy.names else tasks.kind(task), steps_per_epoch)
  if key not in run.compiled:
    tx = optim.make_tx(config, steps_per_epoch, run.data.example_batches[task], stage=k)
    run.compiled[key] = tx, steps.jit_scan_epoch(run.model, tx, task, (), config, run.data.scan[1], steps_per_epoch)
  return run.compiled[key]


def _record(meta, task, records, first_step, label, run, state, progress_args):
  """NaN guard, loss curve and progress line for the steps of `records` (host floats)."""
  _check_finite(records, label, first_step)
  meta['curves'].setdefault(task, []).extend([[first_step + i, r['total']] for i, r in enumerate(records)])
  _log_progress(label, *progress_args, records[-1], run.writer, int(state.step))


def run_stage(k: int, run: Run, tree: dict, progress: checkpoints.Progress) -> dict:
  """Trains stage k with per-epoch validation and early stopping; returns the tree with the best weights."""
  config, task = run.config, run.config.tasks[k]
  meta = progress.meta
  epochs, steps_per_epoch = config.train.epochs[task], run.data.steps_per_epoch[task]
  _, stage_fn = _stage_functions(run, k, task)
  train_set = run.data.train_sets[task]
  label = f'stage {k + 1}/{len(config.tasks)} ({task})'
  total, start = epochs * steps_per_epoch, meta['stage_step']
  start_time = time.time()
  state, context = tree['state'], tree['context']
  for epoch in range(meta['epoch'], epochs):
    if run.data.scan is not None:  # The whole epoch in one compiled call.
      pool, _, ids = run.data.scan
      state, stacked = stage_fn(state, context, pool, ids[task], epoch)
      stacked = jax.device_get(stacked)
      records = [{name: float(v[i]) for name, v in stacked.items()} for i in range(steps_per_epoch)]
      meta['stage_step'] = (epoch + 1) * steps_per_epoch
      _record(meta, task, records, epoch * steps_per_epoch + 1, label, run, state,
              (epoch, epochs, meta['stage_step'] - start, total - start, start_time))
    history = []
    python_steps = range(0) if run.data.scan is not None else range(max(start, epoch * steps_per_epoch),
                                                                    (epoch + 1) * steps_per_epoch)
    for step in python_steps:
      state, metrics = stage_fn(state, run.shard(train_set[step]), context)
      history.append(metrics)
      meta['stage_step'] = step + 1
      if (step + 1) % config.train.log_every_steps == 0 or step + 1 == (epoch + 1) * steps_per_epoch:
        records = [{name: float(v) for name, v in m.items()} for m in jax.device_get(history)]
        _record(meta, task, records, step + 2 - len(records), label, run, state,
                (epoch, epochs, step + 1 - start, total - start, start_time))
        history = []
        if (step + 1) % config.train.checkpoint_every_steps < len(records) and step + 1 < total:
          progress.save(dict(tree, state=state))
    scores = evaluation.evaluate_task(run, task, _variables(state))
    score = scores[tasks.headline(task)]
    meta['epoch'] = epoch + 1
    meta['epoch_scores'].setdefault(task, []).append(score)
    run.writer.write_scalars(int(state.step), {f'val/{task}_{m}': v for m, v in scores.items()})
    logging.info('%s epoch %d/%d validation: %s', label, epoch + 1, epochs,
                 ', '.join(f'{m}={v:.2f}' for m, v in scores.items()))
    if meta['best_score'] is None or score > meta['best_score'] or (
        np.isnan(meta['best_score']) and not np.isnan(score)):
      meta['best_score'], meta['bad_epochs'] = score, 0
      tree = dict(tree, best=parallel.copy_tree(_variables(state)))
    else:
      meta['bad_epochs'] += 1
    tree = dict(tree, state=state)
    progress.save(tree)
    if meta['bad_epochs'] >= config.train.early_stopping_patience:
      logging.info('%s: early stop after epoch %d (best %s %.2f)', label, epoch + 1, tasks.headline(task),
                   meta['best_score'])
      break
  tree = dict(tree, state=state)
  if meta['best_score'] is not None:  # Keep the best epoch's weights (the seed's early stopping).
    best = parallel.copy_tree(tree['best'])  # Own buffers: the next stage's step donates the state.
    tree['state'] = state._replace(params=best['params'], batch_stats=best['batch_stats'])
  return tree


def run_balance(run: Run, tree: dict, meta: dict) -> dict:
  """The optional final fine-tune: `train.balance_finetune_steps` steps on all tasks' memories at once, with a
  fresh base optimizer (one warm-up + cosine over the fine-tune); the strategies' states are put back after."""
  config, num_steps = run.config, run.config.train.balance_finetune_steps
  tx = optim.base_optimizer(config, num_steps)
  step_fn = steps.jit_balance_step(run.model, tx, config.tasks, config)
  strategies_state = tree['state'].opt_state
  # Copied: the step donates its state, and strategies' states may hold the very arrays of the params.
  state = parallel.copy_tree(tree['state']._replace(opt_state=jax.jit(tx.init)(tree['state'].params)))
  label, history, start_time = 'balancing fine-tune', [], time.time()
  for i in range(num_steps):
    state, metrics = step_fn(state, tree['context'])
    history.append(metrics)
    if (i + 1) % config.train.log_every_steps == 0 or i + 1 == num_steps:
      records = [{name: float(v) for name, v in m.items()} for m in jax.device_get(history)]
      _record(meta, 'balance', records, i + 2 - len(records), label, run, state, (0, 1, i + 1, num_steps, start_time))
      history = []
  return dict(tree, state=state._replace(opt_state=strategies_state))


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, dict, dict]:
  """Builds the model, data, mesh and writers; returns the run and the initial array tree."""
  model = build_model(config)
  data = classic.load_data(config) if run_is_classic(config) else inputs.load(config)
  logging.info('%s', data.description)
  mesh = parallel.make_mesh()
  with jax.default_prng_impl('rbg'):  # Compiles several times faster than threefry for the many initialisers.
    key = jax.random.PRNGKey(config.seed)
    if run_is_classic(config):
      example = data.example_batches[config.tasks[0]]
      heads = {'head': jnp.asarray(example['head'][:1])} if 'head' in example else {}  # Multi-head MLPs.
      variables = dict(model.init(key, jnp.asarray(example['image'][:1]), **heads), batch_stats={})
    else:
      variables = multitask.init_variables(model, key, config.model.image_size,
                                           pretrained_path=config.model.pretrained or None,
                                           cls_wnids=imagenet_head_classes(config, data))
  counts = multitask.count_params(variables)
  tx = optim.make_tx(config, data.steps_per_epoch[config.tasks[0]], data.example_batches[config.tasks[0]], stage=0)
  state = optim.initial_state(config, variables, tx)
  teacher = parallel.copy_tree(variables) if 'lwf' in config.strategy.names else {}
  # One memory shared by all tasks for the classic benchmarks (same head, same example shapes), else one per task.
  if config.train.get('joint'):  # Every task's whole training set, from the start.
    memories = consolidation.joint_memories(data, config.tasks)
  else:
    memories = consolidation.initial_memories(config, model, variables, data.example_batches, run_is_classic(config))
  tree = {'state': state, 'context': steps.Context(memories, teacher), 'best': parallel.copy_tree(variables)}
  tree = parallel.replicate(mesh, tree)
  writer = tracking.make_writer(
      config, workdir, metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0))
  eval_steps = {t: steps.jit_eval_step(model, t, config.model.max_detections) for t in config.tasks}
  final = {}
  run = Run(config, workdir, model, data, writer, mesh, eval_steps, int(counts['total']), counts,
            lambda: final['variables'], {})
  return run, tree, final


def imagenet_head_classes(config: ml_collections.ConfigDict, data: inputs.Data):
  """The classification classes' WordNet ids when the cls head starts from the ImageNet classifier, else None."""
  mode = config.model.get('cls_head_init', 'random')
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


def run_is_classic(config: ml_collections.ConfigDict) -> bool:
  return config.model.backbone == 'mlp'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole continual experiment in `workdir`; returns the results dict."""
  run, tree, final = setup_run(config, workdir)
  progress = checkpoints.Progress(workdir)
  tree, resumed = progress.resume(tree)
  tree = parallel.replicate(run.mesh, tree)
  meta = progress.meta
  if resumed:
    logging.info('resuming from checkpoint %d: stage %d, epoch %d, step %d', meta['saves'], meta['stage'] + 1,
                 meta['epoch'], meta['stage_step'])
  else:
    meta['baseline'] = evaluation.evaluate_all(run, _eval_variables(run, tree['state']))
    logging.info('baseline before stage 1: %s', meta['baseline'])
  for k in range(meta['stage'], len(config.tasks)):
    task = config.tasks[k]
    stage_start = time.time() - meta['stage_seconds_so_far']
    if meta['epoch'] == 0 and meta['stage_step'] == 0:  # A new stage: fresh base optimizer, strategies kept.
      tx, _ = _stage_functions(run, k, task)
      state = tree['state']
      # Placed like the step's outputs (replicated on the mesh), or the step's second call would re-trace; and
      # copied, as strategies' states may hold the very arrays of the params (EWC's anchor) and the step donates.
      opt_state = optim.fresh_optimizer_state(tx, state.params, state.opt_state)
      if 'packnet' in config.strategy.names:  # Stage k owns every weight no earlier stage kept.
        opt_state = registry.replace_state(opt_state, packnet.PackNetState, lambda s: packnet.start_task(s, k))
      tree['state'] = parallel.copy_tree(parallel.replicate(run.mesh, state._replace(opt_state=opt_state)))
    tree = run_stage(k, run, tree, progress)
    if 'packnet' in config.strategy.names:  # No checkpoint until the stage snapshot: a resume prunes only once.
      tree = _prune_and_retrain(run, k, tree)
    meta['rows'].append(evaluation.evaluate_all(run, _eval_variables(run, tree['state'])))
    logging.info('after stage %d (%s): %s', k + 1, task, meta['rows'][-1])
    state, context = consolidation.consolidate(tree['state'], tree['context'], task, run.data.memory_examples(task),
                                               model=run.model, config=config)
    tree = parallel.replicate(run.mesh, dict(tree, state=state, context=context))
    meta['stage_seconds'].append(time.time() - stage_start)
    meta.update(stage=k + 1, epoch=0, stage_step=0, best_score=None, bad_epochs=0, stage_seconds_so_far=0.0)
    progress.save(tree, stage_done=k)
  if config.train.balance_finetune_steps and not meta.get('balanced'):
    start = time.time()
    tree = run_balance(run, tree, meta)
    meta['before_balance'] = meta['rows'][-1]
    meta['rows'][-1] = evaluation.evaluate_all(run, _eval_variables(run, tree['state']))
    logging.info('after the balancing fine-tune: %s', meta['rows'][-1])
    meta.update(balanced=True, balance_seconds=time.time() - start)
    progress.save(tree)  # Not a stage snapshot: stage_<T> keeps the model before the fine-tune.
  final['variables'] = _variables(tree['state'])
  results = evaluation.assemble_results(run, meta)
  evaluation.write_reports(run, results)
  tracking.log_run_artifacts(workdir)
  run.writer.close()
  return results
