"""The continual trainer: stages (one per task), evaluation of every task after each, consolidation, snapshots.

`train_and_evaluate(config, workdir)` is the whole job; rerunning it on the same workdir resumes from the newest
complete checkpoint. Each stage compiles its head's train step once and feeds it batches indexed by step, so a
resumed run sees exactly the batches an uninterrupted one would. The trainer knows no strategy by name: it calls
the parts of the `Strategy` values (strategies/base.py) that the active strategies fill in.
"""
import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from clflax import tasks
from clflax.data import pipeline
from clflax.reporting import console
from clflax.reporting import results as results_lib
from clflax.reporting import tracking
from clflax.strategies import registry
from clflax.trainer import checkpoints
from clflax.trainer import consolidate as consolidation
from clflax.trainer import evaluation
from clflax.trainer import optim
from clflax.trainer import parallel
from clflax.trainer import setup
from clflax.trainer import steps
from clflax.trainer.state import Progress
from clflax.trainer.state import TrainTree


def _variables(state) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def eval_variables(run: setup.Run, state):
  """What each task is evaluated with: the model's variables, or (a strategy with `eval_params`, e.g. PackNet)
  a function task -> that task's variables."""
  variables = _variables(state)
  hooks = [s for s in run.strategies if s.eval_params is not None]
  if not hooks:
    return variables
  index = {t: i for i, t in enumerate(run.config.tasks)}

  def for_task(task):
    params = variables['params']
    for s in hooks:
      params = s.eval_params(registry.section(run.config.strategy, s), params, state.opt_state, index[task])
    return dict(variables, params=params)

  return for_task


def _check_finite(records, label, first_step):
  """The NaN guard: stops the run (before any checkpoint of the bad state) naming the stage, step and loss."""
  for offset, record in enumerate(records):
    bad = [k for k, v in record.items() if not np.isfinite(v)]
    if bad:
      raise FloatingPointError(
          f'non-finite {", ".join(sorted(bad))} at {label}, step {first_step + offset}; the last good '
          'checkpoint is kept. Lower the learning rate or enable clipping (config.train.clip_norm).')


def _record(run: setup.Run, progress: Progress, task: str, records: list, first_step: int, label: str, k: int,
            global_step: int) -> None:
  """NaN guard, loss curve, TensorBoard scalars and the progress line for the steps of `records` (host floats)."""
  _check_finite(records, f'stage {k + 1}/{len(run.config.tasks)} ({task})', first_step)
  progress.curves.setdefault(task, []).extend([[first_step + i, r['total']] for i, r in enumerate(records)])
  run.writer.write_scalars(global_step, {f'train/{name}': v for name, v in records[-1].items()})
  run.progress_line.report(k, progress.stage_step, label, records[-1])


def _evaluate(run: setup.Run, state) -> dict:
  start = time.monotonic()
  with run.progress_line.timed('eval'):
    if run.device_eval is not None:
      scores = run.device_eval.evaluate(run.config.tasks, _variables(state))
    else:
      scores = evaluation.evaluate_all(run.config.tasks, run.eval_steps, run.data.eval_batches,
                                       eval_variables(run, state), run.shard_eval, run.hooks)
  run.progress_line.evaluated(time.monotonic() - start)
  return scores


def _count_training(run: setup.Run, progress: Progress, start: float, timed_before: float, steps: int) -> None:
  """Adds the training time since `start` (less the timed parts within it: compiles, in-stage checkpoints) and
  `steps` to the run's totals, so results.json can report the training rate."""
  progress.train_seconds += time.monotonic() - start - (run.progress_line.timed_seconds() - timed_before)
  progress.train_steps += steps


def _train_epoch(run: setup.Run, k: int, tree: TrainTree, progress: Progress, epoch: int, label: str,
                 checkpointer=None) -> TrainTree:
  """One epoch of stage k (from `progress.stage_step` on a resume); in-stage checkpoints when `checkpointer`."""
  config, task = run.config, run.config.tasks[k]
  steps_per_epoch, stage_fn = run.data.steps_per_epoch[task], setup.stage_program(run, k, task)
  state = tree.state
  start, timed_before, steps_before = time.monotonic(), run.progress_line.timed_seconds(), progress.stage_step
  if run.data.scan is not None:  # The whole epoch in one compiled call.
    pool, _, ids = run.data.scan
    state, stacked = stage_fn(state, tree.context, pool, ids[task], epoch)
    setup.call_hooks(run, 'step')
    stacked = jax.device_get(stacked)
    records = [{name: float(v[i]) for name, v in stacked.items()} for i in range(steps_per_epoch)]
    progress.stage_step = (epoch + 1) * steps_per_epoch
    _record(run, progress, task, records, epoch * steps_per_epoch + 1, label, k, int(state.step))
    _count_training(run, progress, start, timed_before, progress.stage_step - steps_before)
    return tree._replace(state=state)
  history = []
  first, end = max(progress.stage_step, epoch * steps_per_epoch), (epoch + 1) * steps_per_epoch
  batches = pipeline.iterate(run.data.train_sets[task], first, end - first,
                             num_threads=config.data.get('read_threads', 0), prefetch=config.data.get('prefetch', 0))
  for step in range(first, end):
    waited = time.monotonic()
    batch = next(batches)
    progress.data_wait_seconds += time.monotonic() - waited
    state, metrics = stage_fn(state, run.shard(batch), tree.context)
    setup.call_hooks(run, 'step')
    history.append(metrics)
    progress.stage_step = step + 1
    if (step + 1) % config.train.log_every_steps == 0 or step + 1 == (epoch + 1) * steps_per_epoch:
      records = [{name: float(v) for name, v in m.items()} for m in jax.device_get(history)]
      _record(run, progress, task, records, step + 2 - len(records), label, k, int(state.step))
      history = []
      total = config.train.epochs[task] * steps_per_epoch
      if checkpointer and (step + 1) % config.train.checkpoint_every_steps < len(records) and step + 1 < total:
        _count_training(run, progress, start, timed_before, progress.stage_step - steps_before)
        start, timed_before, steps_before = time.monotonic(), run.progress_line.timed_seconds(), progress.stage_step
        with run.progress_line.timed('checkpoint'):
          checkpointer.save(tree._replace(state=state), progress)
  _count_training(run, progress, start, timed_before, progress.stage_step - steps_before)
  return tree._replace(state=state)


def run_stage(k: int, run: setup.Run, tree: TrainTree, progress: Progress,
              checkpointer: checkpoints.Checkpointer) -> TrainTree:
  """Trains stage k with per-epoch validation and early stopping; returns the tree with the best weights."""
  config, task = run.config, run.config.tasks[k]
  epochs = config.train.epochs[task]
  label = f'stage {k + 1}/{len(config.tasks)} {task}'
  run.progress_line.restart_interval(sum(run.stage_steps[:k]) + progress.stage_step)
  for epoch in range(progress.epoch, epochs):
    tree = _train_epoch(run, k, tree, progress, epoch, f'{label} | epoch {epoch + 1}/{epochs}', checkpointer)
    start = time.monotonic()
    with run.progress_line.timed('eval'):
      if run.device_eval is not None:
        scores = run.device_eval.evaluate((task,), _variables(tree.state))[task]
      else:
        scores = evaluation.evaluate_task(task, run.eval_steps[task], run.data.eval_batches[task],
                                          _variables(tree.state), run.shard_eval, run.hooks)
    run.progress_line.evaluated(time.monotonic() - start)
    score = scores[tasks.headline(task)]
    progress.epoch = epoch + 1
    progress.epoch_scores.setdefault(task, []).append(score)
    run.writer.write_scalars(int(tree.state.step), {f'val/{task}_{m}': v for m, v in scores.items()})
    logging.info('%s | epoch %d/%d validation: %s', label, epoch + 1, epochs,
                 ', '.join(f'{m} {v:.2f}' for m, v in scores.items()))
    if progress.best_score is None or score > progress.best_score or (
        np.isnan(progress.best_score) and not np.isnan(score)):
      progress.best_score, progress.bad_epochs = score, 0
      tree = tree._replace(best=parallel.copy_tree(_variables(tree.state)))
    else:
      progress.bad_epochs += 1
    with run.progress_line.timed('checkpoint'):
      checkpointer.save(tree, progress)
    if progress.bad_epochs >= config.train.early_stopping_patience:
      logging.info('%s: early stop after epoch %d (best %s %.2f)', label, epoch + 1, tasks.headline(task),
                   progress.best_score)
      break
  if progress.best_score is not None:  # Keep the best epoch's weights (the seed's early stopping).
    best = parallel.copy_tree(tree.best)  # Own buffers: the next stage's step donates the state.
    tree = tree._replace(state=tree.state._replace(params=best['params'], batch_stats=best['batch_stats']))
  return tree


def _finish_training(run: setup.Run, k: int, tree: TrainTree, progress: Progress) -> TrainTree:
  """The strategies' edits after a stage's epochs (PackNet's pruning), then the extra epochs they ask for
  (fresh shuffles; no validation, early stopping or checkpoint: a resume redoes this from the last snapshot)."""
  extra, state = 0, tree.state
  for s in run.strategies:
    if s.finish_training is not None:
      state, more = s.finish_training(registry.section(run.config.strategy, s), state, k)
      extra = max(extra, more)
  if state is tree.state:
    return tree
  tree = tree._replace(state=parallel.copy_tree(parallel.replicate(run.mesh, state)))
  epochs, saved = run.config.train.epochs[run.config.tasks[k]], progress.stage_step
  for epoch in range(epochs, epochs + extra):
    progress.stage_step = epoch * run.data.steps_per_epoch[run.config.tasks[k]]
    tree = _train_epoch(run, k, tree, progress, epoch, f'stage {k + 1}/{len(run.config.tasks)} '
                        f'{run.config.tasks[k]} | retraining {epoch - epochs + 1}/{extra}')
  progress.stage_step = saved
  logging.info('stage %d (%s): %d strategy epoch(s) after training', k + 1, run.config.tasks[k], extra)
  return tree


def _start_stage(run: setup.Run, k: int, tree: TrainTree) -> TrainTree:
  """A new stage: a fresh base optimizer, the strategies' states kept, their `start_stage` applied."""
  task = run.config.tasks[k]
  tx = optim.make_tx(run.config, run.data.steps_per_epoch[task], run.data.example_batches[task], stage=k, task=task)
  state = tree.state
  state = state._replace(opt_state=optim.fresh_optimizer_state(run.config, tx, state.params, state.opt_state))
  for s in run.strategies:
    if s.start_stage is not None:
      state = s.start_stage(registry.section(run.config.strategy, s), state, k)
  # Placed like the step's outputs (replicated on the mesh), or the step's second call would re-trace; and copied,
  # as strategies' states may hold the very arrays of the params (EWC's anchor) and the step donates its state.
  return tree._replace(state=parallel.copy_tree(parallel.replicate(run.mesh, state)))


def run_balance(run: setup.Run, tree: TrainTree, progress: Progress) -> TrainTree:
  """The optional final fine-tune: `train.balance_finetune_steps` steps on all tasks' memories at once, with a
  fresh base optimizer (one warm-up + cosine over the fine-tune); the strategies' states are put back after."""
  config, num_steps = run.config, run.config.train.balance_finetune_steps
  tx = optim.base_optimizer(config, num_steps)
  step_fn = steps.jit_balance_step(run.model, tx, config.tasks, config)
  strategies_state = tree.state.opt_state
  # Copied: the step donates its state, and strategies' states may hold the very arrays of the params.
  state = parallel.copy_tree(tree.state._replace(opt_state=jax.jit(tx.init)(tree.state.params)))
  history = []
  for i in range(num_steps):
    state, metrics = step_fn(state, tree.context)
    history.append(metrics)
    if (i + 1) % config.train.log_every_steps == 0 or i + 1 == num_steps:
      records = [{name: float(v) for name, v in m.items()} for m in jax.device_get(history)]
      _check_finite(records, 'balancing fine-tune', i + 2 - len(records))
      progress.curves.setdefault('balance', []).extend(
          [[i + 2 - len(records) + j, r['total']] for j, r in enumerate(records)])
      logging.info('balancing fine-tune | step %d/%d | loss %.4g', i + 1, num_steps, records[-1]['total'])
      history = []
  return tree._replace(state=state._replace(opt_state=strategies_state))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Callable[[str], None]] = (), data=None) -> dict[str, Any]:
  """Runs (or resumes) the whole continual experiment in `workdir`; returns the results dict.

  `hooks` are called with the name of each point the run reaches (clflax.trainer.hooks), e.g. to inject faults.
  `data` (a `clflax.data.inputs.Data`, e.g. `inputs.from_arrays(...)`) replaces the datasets the config names.
  """
  run, tree = setup.setup_run(config, workdir, tuple(hooks), data)
  checkpointer = checkpoints.Checkpointer(workdir, run.hooks)
  tree, progress = checkpointer.resume(tree)
  tree = parallel.replicate(run.mesh, tree)
  if progress is not None:
    logging.info('resuming from checkpoint %d: stage %d, epoch %d, step %d', progress.saves, progress.stage + 1,
                 progress.epoch, progress.stage_step)
  else:
    progress = Progress()
    progress.baseline = _evaluate(run, tree.state)
    logging.info('before stage 1: %s', console.scores_line(progress.baseline))
  for k in range(progress.stage, len(config.tasks)):
    task = config.tasks[k]
    stage_start = time.time() - progress.stage_seconds_so_far
    if progress.epoch == 0 and progress.stage_step == 0:
      tree = _start_stage(run, k, tree)
    tree = run_stage(k, run, tree, progress, checkpointer)
    tree = _finish_training(run, k, tree, progress)
    progress.rows.append(_evaluate(run, tree.state))
    with run.progress_line.timed('consolidate'):
      state, context = consolidation.consolidate(
          tree.state, tree.context, task, k, run.data.memory_examples(task, run.examples_per_task),
          model=run.model, config=config)
    setup.call_hooks(run, 'consolidate')
    tree = parallel.replicate(run.mesh, tree._replace(state=state, context=context))
    progress.stage_seconds.append(time.time() - stage_start)
    logging.info('after stage %d (%s, %s): %s', k + 1, task, console.duration(progress.stage_seconds[-1]),
                 console.scores_line(progress.rows[-1]))
    progress.start_stage(k + 1)
    with run.progress_line.timed('checkpoint'):
      checkpointer.save(tree, progress, stage_done=k)
  if config.train.balance_finetune_steps and not progress.balanced:
    start = time.time()
    tree = run_balance(run, tree, progress)
    progress.before_balance = progress.rows[-1]
    progress.rows[-1] = _evaluate(run, tree.state)
    logging.info('after the balancing fine-tune: %s', console.scores_line(progress.rows[-1]))
    progress.balanced, progress.balance_seconds = True, time.time() - start
    checkpointer.save(tree, progress)  # Not a stage snapshot: stage_<T> keeps the model before the fine-tune.
  if run.device_eval is not None:
    times = run.device_eval.inference_times(_variables(tree.state))
  else:
    times = evaluation.inference_times(run.config.tasks, run.eval_steps, run.data.eval_batches,
                                       _variables(tree.state), run.shard_eval)
  results = results_lib.assemble(config, progress, run.param_counts, times, run.data.description)
  results_lib.write_reports(workdir, results, after_results=lambda: setup.call_hooks(run, 'report'))
  logging.info('time: %s; of the training, %s waiting for data (%.1f%%)', run.progress_line.breakdown(),
               console.duration(progress.data_wait_seconds),
               100 * progress.data_wait_seconds / max(progress.train_seconds, 1e-9))
  tracking.log_run_artifacts(workdir)
  run.close()
  return results
