"""Evaluation of every task after every stage, and the run's reports (results.json, summary.md, plots).

Score matrices follow the contract: `matrix[i][j]` is task j's score after stage i (percent). The baseline row
(every task before stage 1: pretrained backbone, untrained heads) gives FWT.
"""
import os
import time
from typing import Any

import jax
import numpy as np

from clflax import metrics
from clflax import plots as plotting  # (`plots` below is the plot folder)
from clflax import report
from clflax import tasks
from clflax import workdirs


def evaluate_task(run, task: str, variables: dict) -> dict[str, float]:
  """Scores of `task` on its validation split (percent)."""
  eval_step = run.eval_steps[task]
  acc = tasks.new_accumulator(task)
  for batch in run.data.eval_batches[task]:
    outputs = jax.device_get(eval_step(variables, run.shard(batch)))
    acc = tasks.accumulate(task, acc, outputs, batch)
  return tasks.scores(task, acc)


def evaluate_all(run, variables) -> dict[str, dict[str, float]]:
  """Every task's scores; `variables` is one dict, or task -> dict (task-specific weights, e.g. PackNet's)."""
  pick = variables if callable(variables) else (lambda _: variables)
  return {task: evaluate_task(run, task, pick(task)) for task in run.config.tasks}


def _matrices(task_names, rows) -> dict[str, list[list[float]]]:
  """metric -> [stage][task] matrix; a metric a task does not have is NaN in that column."""
  names = sorted({m for row in rows for task in task_names for m in row[task]})
  return {m: [[row[t].get(m, float('nan')) for t in task_names] for row in rows] for m in names}


def assemble_results(run, meta: dict) -> dict[str, Any]:
  """The results.json dict (DESIGN.md contract) from the scores recorded during the run."""
  config, task_names = run.config, list(run.config.tasks)
  matrices = _matrices(task_names, meta['rows'])
  headline = np.array([[row[t][tasks.headline(t)] for t in task_names] for row in meta['rows']])
  baseline = np.array([meta['baseline'][t][tasks.headline(t)] for t in task_names])
  summary = {'headline': metrics.continual_summary(headline, baseline)}
  for name, matrix in matrices.items():
    if not np.isnan(np.asarray(matrix, float)).any():
      summary[name] = metrics.continual_summary(np.asarray(matrix), None)
  extra = {}
  if 'before_balance' in meta:  # The last row is after the balancing fine-tune; this one before it.
    extra = {'before_balance': meta['before_balance'], 'balance_seconds': meta['balance_seconds']}
  return {
      **extra,
      'config': workdirs.flatten(config),
      'stages': task_names,
      'stage_titles': [tasks.title(t) for t in task_names],
      'headline_metrics': {t: tasks.headline(t) for t in task_names},
      'metrics': matrices,
      'headline': headline.tolist(),
      'baseline': {t: meta['baseline'][t] for t in task_names},
      'summary': summary,
      'criterion': metrics.criterion(headline, task_names, config.eval.criterion_tolerance),
      'params': run.param_count,
      'params_per_part': run.param_report,
      'timing': {'stage_seconds': meta['stage_seconds'], 'total_seconds': float(sum(meta['stage_seconds'])),
                 'inference_ms_per_image': inference_times(run, meta)},
      'curves': meta['curves'],
      'epoch_scores': meta['epoch_scores'],
      'data': run.data.description,
  }


def inference_times(run, meta) -> dict[str, float]:
  """Median milliseconds per image of each head's jitted eval step (after warm-up)."""
  times = {}
  variables = run.final_variables()
  for task in run.config.tasks:
    batch = run.shard(run.data.eval_batches[task][0])
    jax.block_until_ready(run.eval_steps[task](variables, batch))
    samples = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(run.eval_steps[task](variables, batch))
      samples.append(time.perf_counter() - start)
    times[task] = 1000 * float(np.median(samples)) / len(batch['valid'])
  return times


def write_reports(run, results: dict) -> None:
  """results.json, summary.md and the PNG plots in the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  workdir = run.workdir
  plots = os.path.join(workdir, 'plots')
  os.makedirs(plots, exist_ok=True)
  titles = results['stage_titles']
  plotting.plot_loss_curves(os.path.join(plots, 'loss_curves.png'),
                            {tasks.title(t): tuple(np.asarray(c).T) for t, c in results['curves'].items() if c})
  plotting.plot_matrix(os.path.join(plots, 'headline_matrix.png'), np.asarray(results['headline']),
                       [f'after {t}' for t in titles], titles, 'Score of each task after each stage (headline metric)')
  plotting.plot_evolution(os.path.join(plots, 'evolution.png'),
                          {tasks.headline(t): np.asarray(results['metrics'][tasks.headline(t)])
                           for t in results['stages']}, titles)
  report.write_results(workdir, results)
  report.write_summary(workdir, results)
