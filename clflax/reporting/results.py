"""A run's results: the results.json dict (the contract of docs/design.md) and the reports written from it.

Score matrices: `matrix[i][j]` is task j's score after stage i (percent). The baseline row (every task before
stage 1: pretrained backbone, untrained heads) gives FWT.
"""
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from clflax import metrics
from clflax import tasks
from clflax.reporting import plots as plotting
from clflax.reporting import report
from clflax.runtime import files
from clflax.trainer import workdirs


def _matrices(task_names, rows) -> dict[str, list[list[float]]]:
  """metric -> [stage][task] matrix; a metric a task does not have is NaN in that column."""
  names = sorted({m for row in rows for task in task_names for m in row[task]})
  return {m: [[row[t].get(m, float('nan')) for t in task_names] for row in rows] for m in names}


def assemble(config, progress, param_counts: dict, inference_ms: dict, data_description: str) -> dict[str, Any]:
  """The results.json dict from the scores a run recorded (`progress`: a trainer.state.Progress)."""
  task_names = list(config.tasks)
  matrices = _matrices(task_names, progress.rows)
  headline = np.array([[row[t][tasks.headline(t)] for t in task_names] for row in progress.rows])
  baseline = np.array([progress.baseline[t][tasks.headline(t)] for t in task_names])
  summary = {'headline': metrics.continual_summary(headline, baseline)}
  for name, matrix in matrices.items():
    if not np.isnan(np.asarray(matrix, float)).any():
      summary[name] = metrics.continual_summary(np.asarray(matrix), None)
  extra = {}
  if progress.balanced:  # The last row is after the balancing fine-tune; this one before it.
    extra = {'before_balance': progress.before_balance, 'balance_seconds': progress.balance_seconds}
  return {
      **extra,
      'config': workdirs.flatten(config),
      'stages': task_names,
      'stage_titles': [tasks.title(t) for t in task_names],
      'headline_metrics': {t: tasks.headline(t) for t in task_names},
      'metrics': matrices,
      'headline': headline.tolist(),
      'baseline': {t: progress.baseline[t] for t in task_names},
      'summary': summary,
      'criterion': metrics.criterion(headline, task_names, config.eval.criterion_tolerance),
      'params': int(param_counts['total']),
      'params_per_part': param_counts,
      'timing': {'stage_seconds': progress.stage_seconds, 'total_seconds': float(sum(progress.stage_seconds)),
                 'train_seconds': progress.train_seconds, 'train_steps': progress.train_steps,
                 'train_steps_per_s': progress.train_steps / max(progress.train_seconds, 1e-9),
                 'data_wait_seconds': progress.data_wait_seconds,
                 'inference_ms_per_image': inference_ms},
      'curves': progress.curves,
      'epoch_scores': progress.epoch_scores,
      'data': data_description,
  }


def plot_paths(workdir: str) -> list[str]:
  plots = os.path.join(workdir, 'plots')
  return [os.path.join(plots, name) for name in ('loss_curves.png', 'headline_matrix.png', 'evolution.png')]


def write_reports(workdir: str, results: dict, after_results: Optional[Callable[[], None]] = None) -> None:
  """results.json, summary.md and the PNG plots in `workdir` (process 0 only); `after_results` runs between
  results.json and summary.md (a hook point)."""
  if jax.process_index() != 0:
    return
  curves_png, matrix_png, evolution_png = plot_paths(workdir)
  files.makedirs(os.path.dirname(curves_png))
  titles = results['stage_titles']
  plotting.plot_loss_curves(curves_png, {tasks.title(t): tuple(np.asarray(c).T)
                                         for t, c in results['curves'].items() if c})
  plotting.plot_matrix(matrix_png, np.asarray(results['headline']), [f'after {t}' for t in titles], titles,
                       'Score of each task after each stage (headline metric)')
  plotting.plot_evolution(evolution_png, {tasks.headline(t): np.asarray(results['metrics'][tasks.headline(t)])
                                          for t in results['stages']}, titles)
  report.write_results(workdir, results)
  if after_results is not None:
    after_results()
  report.write_summary(workdir, results)
