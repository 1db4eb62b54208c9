"""PNG plots: one run's loss curves, score matrices and score evolution, and the comparison of runs (compare.py).

Everything draws on `matplotlib.figure.Figure` (Agg canvas): no pyplot global state, no display needed. Long task
names are wrapped onto several lines rather than rotated; figures grow with the number of tasks.
"""
import io
import math
import os
import textwrap
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from clflax.reporting import report
from clflax.runtime import files

Curves = Mapping[str, Tuple[Sequence[float], Sequence[float]]]


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=120, layout="constrained")  # makes room for titles and labels


def _save(fig, path: str) -> str:
  """The figure as the image file `path` on any filesystem the workdir may be on (format from the extension)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or "png", bbox_inches="tight")  # Drawn by Agg.
  files.write_bytes(path, buffer.getvalue())
  return path


def _colors(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def _wrap(label, width: int = 14) -> str:
  return textwrap.fill(str(label), width, break_long_words=False) or str(label)


def _ticks(ax, labels: Sequence[str], axis: str = "x", fontsize="small") -> None:
  """Tick labels wrapped onto lines; rotated only when there are too many for that."""
  many = len(labels) > 6
  texts = [str(s) if many else _wrap(s) for s in labels]
  rotate = many and max(len(s) for s in texts) > 6
  if axis == "x":
    ax.set_xticks(range(len(labels)), labels=texts, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                  fontsize=fontsize)
  else:
    ax.set_yticks(range(len(labels)), labels=texts, fontsize=fontsize)


# ------------------------------------------------------------------------------------------------ one run


def _log_scale(values: np.ndarray) -> bool:
  finite = values[np.isfinite(values)]
  return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 100)


def _smoothed(losses: np.ndarray) -> np.ndarray | None:
  """A running mean over ~2% of the points for long, noisy per-step curves (None for short ones)."""
  window = losses.size // 50
  if window < 5:
    return None
  kernel = np.ones(window) / window
  padded = np.concatenate([np.full(window - 1, losses[0]), losses])
  return np.convolve(padded, kernel, mode="valid")


def _plot_curve(ax, steps, losses, color, label=None):
  """Raw per-step losses, faint under their running mean when they are long enough to be noise."""
  smooth = _smoothed(losses)
  if smooth is None:
    ax.plot(steps, losses, color=color, linewidth=1.2, marker="o" if steps.size < 20 else None, markersize=3,
            label=label)
  else:
    ax.plot(steps, losses, color=color, linewidth=0.5, alpha=0.25)
    ax.plot(steps, smooth, color=color, linewidth=1.4, label=label)


def plot_loss_curves(path: str, curves: Curves, title: str = "Training loss per stage", ylabel: str = "loss") -> str:
  """Loss against step. Up to 4 stages: one panel each (their losses differ in kind and scale); more: one panel,
  stages laid end to end when their step counts restart. Log scale when a panel spans more than two decades."""
  if not curves:
    raise ValueError("no loss curves to plot")
  data = []
  for stage, (steps, losses) in curves.items():
    steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
    if steps.shape != losses.shape:
      raise ValueError(f"stage '{stage}': {steps.size} steps but {losses.size} losses")
    data.append((str(stage), steps, losses))
  colors = _colors(len(data))
  if any(_smoothed(losses) is not None for _, _, losses in data):
    title += "\n(lines: running mean over 2% of a stage's steps; faint: every step)"
  if len(data) <= 4:
    fig = _figure(max(5.0, 3.8 * len(data)), 3.6)
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    for ax, (stage, steps, losses), color in zip(axes, data, colors):
      _plot_curve(ax, steps, losses, color)
      log = _log_scale(losses)
      if log:
        ax.set_yscale("log")
      ax.set(title=_wrap(stage, 30), xlabel="training step")
      ax.set_ylabel(f"{ylabel} (log scale)" if log else ylabel)
      ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
  fig = _figure(9, 4.5)
  ax = fig.add_subplot()
  offset, restarted = 0.0, False
  for k, (stage, steps, losses) in enumerate(data):
    if k and steps.size and steps.min() <= offset:  # stage-local step counts: continue after the last stage
      restarted, steps = True, steps + offset
    _plot_curve(ax, steps, losses, colors[k], label=stage)
    if k and steps.size:
      ax.axvline(steps.min(), color="0.6", linewidth=0.6, linestyle="--")
    offset = max(offset, float(steps.max()) if steps.size else offset)
  log = _log_scale(np.concatenate([d[2] for d in data]))
  if log:
    ax.set_yscale("log")
  ax.set(title=title, xlabel="training step" + (" (stages laid end to end)" if restarted else ""),
         ylabel=f"{ylabel} (log scale)" if log else ylabel)
  ax.grid(alpha=0.3)
  ax.legend(title="stage", fontsize="small", ncol=1 if len(data) <= 12 else 2, loc="upper left",
            bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def _heatmap(ax, m: np.ndarray, row_labels, col_labels, vmin: float, vmax: float, annotate: bool = True):
  """Heatmap on `ax`, numbers in the cells (NaN cells grey, 'n/a'); returns the image for a colorbar."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  rows, cols = m.shape
  image = ax.imshow(np.ma.masked_invalid(m), cmap=colormaps["viridis"].with_extremes(bad="0.85"), vmin=vmin,
                    vmax=max(vmax, vmin + 1e-9), aspect="auto")
  size = max(5.0, min(10.0, 110.0 / max(rows, cols)))
  for i in range(rows if annotate else 0):
    for j in range(cols):
      v = m[i, j]
      dark = not np.isfinite(v) or image.norm(v) > 0.6  # viridis is light at the top
      ax.text(j, i, report._fmt(v) if np.isfinite(v) else "n/a", ha="center", va="center", fontsize=size,
              color="black" if dark else "white")
  _ticks(ax, col_labels, "x", fontsize=size + 1)
  _ticks(ax, row_labels, "y", fontsize=size + 1)
  return image


def _limits(values: np.ndarray, unit: str) -> Tuple[float, float]:
  finite = values[np.isfinite(values)]
  vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  if unit == "%":  # one fixed scale, so that close scores do not look far apart
    vmin, vmax = min(vmin, 0.0), max(vmax, 100.0)
  return vmin, vmax


def plot_matrix(path: str, matrix, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
                unit: str = "%", xlabel: str = "evaluated task", ylabel: str = "after training stage") -> str:
  """Annotated heatmap of a score matrix (NaN cells grey, 'n/a')."""
  m = np.asarray(matrix, np.float64)
  if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f"matrix of shape {m.shape} does not match {len(row_labels)} row and "
                     f"{len(col_labels)} column labels")
  rows, cols = m.shape
  fig = _figure(max(5.0, 0.75 * cols + 3.0), max(3.5, 0.5 * rows + 2.0))
  ax = fig.add_subplot()
  image = _heatmap(ax, m, row_labels, col_labels, *_limits(m, unit))
  fig.colorbar(image, ax=ax, label=f"score ({unit})")
  ax.set(xlabel=xlabel, ylabel=ylabel)
  ax.set_title(_wrap(title, 60))
  return _save(fig, path)


def plot_evolution(path: str, matrices: Mapping[str, Any], task_names: Sequence[str],
                   stage_labels: Optional[Sequence[str]] = None, unit: str = "%") -> str:
  """Each task's score after every stage, one panel per metric (dotted: before the task's own stage). Tasks
  without the metric are left out of its panel; when every panel would hold one task (each task in its own
  headline metric), they share one panel."""
  if not matrices:
    raise ValueError("no matrices to plot")
  t = len(task_names)
  stage_labels = list(stage_labels or task_names)
  panels = []  # (title, ylabel, [(task index, column, legend label)])
  for metric, matrix in matrices.items():
    m = np.asarray(matrix, np.float64)
    if m.shape != (len(stage_labels), t):
      raise ValueError(f"'{metric}' matrix of shape {m.shape}, expected ({len(stage_labels)}, {t})")
    label = report.metric_label(metric)
    lines = [(j, m[:, j], str(task_names[j])) for j in range(t) if np.isfinite(m[:, j]).any()]
    panels.append((label, f"{label} ({unit})", lines))
  if len(panels) > 1 and all(len(p[2]) == 1 for p in panels) and len({p[2][0][0] for p in panels}) == len(panels):
    lines = sorted((p[2][0][0], p[2][0][1], f"{p[2][0][2]} ({p[0]})") for p in panels)
    panels = [("Headline metric of each task", f"score ({unit})", lines)]
  ncols = min(len(panels), 3)
  nrows = math.ceil(len(panels) / ncols)
  fig = _figure(max(6.0, 4.8 * ncols + 0.35 * len(stage_labels)), 4.0 * nrows + 0.4)
  colors = _colors(t)
  x = np.arange(len(stage_labels))
  for k, (title, ylabel, lines) in enumerate(panels):
    ax = fig.add_subplot(nrows, ncols, k + 1)
    for j, column, label in lines:
      ax.plot(x[: j + 1], column[: j + 1], color=colors[j], linestyle=":", linewidth=1, alpha=0.7)
      ax.plot(x[j:], column[j:], color=colors[j], marker="o", markersize=3, linewidth=1.4, label=_wrap(label, 28))
    if len(lines) > 6 and len({j for j, _, _ in lines}) == len(lines):  # many lines: show their trend too
      learned = np.array([[column[i] if j <= i else np.nan for j, column, _ in lines] for i in range(len(x))])
      ax.plot(x, np.nanmean(learned, axis=1), color="black", linewidth=2.5, label="mean of learned tasks")
    _ticks(ax, [f"after {s}" for s in stage_labels])
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(title="task", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                ncol=1 if len(lines) <= 12 else 2)
  fig.suptitle("Score of each task across training stages (dotted: before its own stage)")
  return _save(fig, path)


def write_plots(workdir: str, results: Mapping[str, Any], curves: Optional[Curves] = None) -> list:
  """workdir/plots/: matrix_headline.png (each task's headline metric), matrix_<metric>.png for metrics that
  several tasks share, evolution.png (headline metrics), and loss_curves.png when curves are given."""
  report.validate_results(results)
  stages, plots = list(results["stages"]), os.path.join(workdir, "plots")
  rows = [f"after {s}" for s in stages]
  v = report._view(results)
  mixed = len(set(v.names)) > 1  # name each column's metric
  cols = [f"{s} ({report.metric_label(n)})" for s, n in zip(stages, v.names)] if mixed else stages
  paths = [plot_matrix(os.path.join(plots, "matrix_headline.png"), v.r, rows, cols,
                       f"{v.headline} of each task after each stage")]
  for m, matrix in results["metrics"].items():
    if np.sum(np.isfinite(np.asarray(matrix, np.float64)).any(axis=0)) > 1 and any(n != m for n in v.names):
      paths.append(plot_matrix(os.path.join(plots, f"matrix_{m}.png"), matrix, rows, stages,
                               f"{report.metric_label(m)} of each task after each stage"))
  paths.append(plot_evolution(os.path.join(plots, "evolution.png"),
                              {m: results["metrics"][m] for m in dict.fromkeys(v.names)}, stages))
  if curves:
    paths.append(plot_loss_curves(os.path.join(plots, "loss_curves.png"), curves))
  return paths


# ------------------------------------------------------------------------------------------------ comparison


def plot_group_bars(path: str, categories: Sequence[str], groups: Mapping[str, Sequence[Sequence[float]]],
                    title: str, ylabel: str, unit: str = "%") -> str:
  """Grouped bars: for each category (a task, or ACC/BWT/forgetting) one bar per group at the mean of its runs,
  the standard deviation as an error bar and every run as a dot. `groups[g][c]` lists group g's values for
  category c (NaN or an empty list: no bar)."""
  if not groups or not categories:
    raise ValueError("no groups or categories to plot")
  names, colors = list(groups), _colors(len(groups))
  width = 0.8 / len(names)
  fig = _figure(min(16.0, max(5.5, 0.9 + len(categories) * (0.45 * len(names) + 0.6))), 4.2)
  ax = fig.add_subplot()
  for g, (name, color) in enumerate(zip(names, colors)):
    if len(groups[name]) != len(categories):
      raise ValueError(f"group '{name}' has {len(groups[name])} value lists for {len(categories)} categories")
    for c, values in enumerate(groups[name]):
      v = np.asarray(values, np.float64).reshape(-1)
      v = v[np.isfinite(v)]
      if not v.size:
        continue
      x = c - 0.4 + width * (g + 0.5)
      ax.bar(x, v.mean(), width * 0.9, color=color, alpha=0.85, label=name,
             yerr=np.std(v, ddof=1) if v.size > 1 else None, capsize=min(3.0, 30 * width), error_kw={"linewidth": 1})
      ax.plot(np.full(v.size, x), v, linestyle="none", marker="o", markersize=2.5, color="black", alpha=0.6)
  ax.axhline(0.0, color="black", linewidth=0.8)
  _ticks(ax, categories)
  ax.set(title=title, ylabel=f"{ylabel} ({unit})" if unit else ylabel)
  ax.grid(axis="y", alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), [_wrap(s, 24) for s in unique], title="bars: mean ± std; dots: runs",
            fontsize="small", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def plot_matrices(path: str, matrices: Mapping[str, Any], row_labels: Sequence[str], col_labels: Sequence[str],
                  title: str, unit: str = "%") -> str:
  """Score-matrix heatmaps side by side (one per group) on one colour scale; numbers written in the cells up to
  10 tasks (beyond that the colour bar reads them)."""
  if not matrices:
    raise ValueError("no matrices to plot")
  ms = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
  for name, m in ms.items():
    if m.shape != (len(row_labels), len(col_labels)):
      raise ValueError(f"'{name}' matrix of shape {m.shape} does not match {len(row_labels)} row and "
                       f"{len(col_labels)} column labels")
  vmin, vmax = _limits(np.concatenate([m.reshape(-1) for m in ms.values()]), unit)
  rows, cols, n = len(row_labels), len(col_labels), len(ms)
  annotate = cols <= 10
  ncols = min(n, 3 if cols <= 6 else 2)
  nrows = math.ceil(n / ncols)
  cell = 1.0 if cols <= 6 else 0.3
  fig = _figure(ncols * (cell * cols + 1.8) + 1.8, nrows * (cell * 0.6 * rows + 1.6) + 0.6)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  for k, (name, m) in enumerate(ms.items()):
    ax = axes[k // ncols, k % ncols]
    first = k % ncols == 0
    image = _heatmap(ax, m, row_labels if first else [""] * rows, col_labels, vmin, vmax, annotate)
    ax.set_title(_wrap(name, 30))
    ax.set_xlabel("evaluated task")
    if first:
      ax.set_ylabel("after training stage")
  for k in range(n, nrows * ncols):
    axes[k // ncols, k % ncols].set_visible(False)
  fig.suptitle(title)
  fig.colorbar(image, ax=axes.ravel().tolist(), label=f"score ({unit})", shrink=0.9)
  return _save(fig, path)


def plot_group_evolution(path: str, series: Mapping[str, Tuple[Any, Any]], task_names: Sequence[str],
                         ylabels: Sequence[str], stage_labels: Optional[Sequence[str]] = None) -> str:
  """Scores across stages per group, from `series[g]` = (mean, std) matrices [stage, task] over g's runs.

  Up to 6 tasks: one panel per task, a line per group (± std band with up to 4 groups; dotted before the task's
  own stage). More tasks: one panel, the mean score of the tasks learned so far after each stage."""
  if not series:
    raise ValueError("no groups to plot")
  t = len(task_names)
  stage_labels = list(stage_labels or task_names)
  if len(ylabels) != t:
    raise ValueError(f"{len(ylabels)} y labels for {t} tasks")
  data = {}
  for name, (mean, std) in series.items():
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (len(stage_labels), t) or std.shape != mean.shape:
      raise ValueError(f"group '{name}': mean/std of shapes {mean.shape}/{std.shape}, expected "
                       f"({len(stage_labels)}, {t})")
    data[name] = (mean, np.nan_to_num(std))
  colors, x = _colors(len(data)), np.arange(len(stage_labels))
  ticks = [f"after {s}" for s in stage_labels]
  if t > 6:
    fig = _figure(min(16.0, max(7.0, 0.45 * len(x) + 3.0)), 4.5)
    ax = fig.add_subplot()
    for (name, (mean, _)), color in zip(data.items(), colors):
      seen = [np.nanmean(mean[i, : i + 1]) for i in range(len(x))]
      ax.plot(x, seen, color=color, marker="o", markersize=3, linewidth=1.4, label=_wrap(name, 24))
    _ticks(ax, ticks)
    units = sorted(set(ylabels))
    ax.set(title="Mean score of the tasks learned so far (mean over runs)",
           ylabel=units[0] if len(units) == 1 else "score (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="group", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
  spread = len(data) <= 4  # more bands than that hide each other
  ncols = min(t, 3)
  nrows = math.ceil(t / ncols)
  fig = _figure(max(6.0, 4.4 * ncols + 0.3 * len(x)), 3.8 * nrows + 0.4)
  for j in range(t):
    ax = fig.add_subplot(nrows, ncols, j + 1)
    for (name, (mean, std)), color in zip(data.items(), colors):
      ax.plot(x[: j + 1], mean[: j + 1, j], color=color, linestyle=":", linewidth=1, alpha=0.7)
      ax.plot(x[j:], mean[j:, j], color=color, marker="o", markersize=3, linewidth=1.4, label=_wrap(name, 24))
      if spread and j < len(x) - 1:
        ax.fill_between(x[j:], mean[j:, j] - std[j:, j], mean[j:, j] + std[j:, j], color=color, alpha=0.2,
                        linewidth=0)
      elif spread:  # a single point has no band: an error bar instead
        ax.errorbar(x[j:], mean[j:, j], yerr=std[j:, j], fmt="none", ecolor=color, capsize=4, linewidth=1)
    _ticks(ax, ticks)
    ax.set(title=_wrap(task_names[j], 40), ylabel=ylabels[j])
    ax.grid(alpha=0.3)
  handles, labels = fig.axes[0].get_legend_handles_labels()
  fig.suptitle("Each task's score across training stages (mean over runs" + (", band: ± std" if spread else "")
               + "; dotted: before its own stage)")
  fig.legend(handles, labels, title="group", fontsize="small", loc="outside right center")
  return _save(fig, path)
