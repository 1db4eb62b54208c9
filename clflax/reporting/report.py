"""Run reports: results.json (the contract of docs/design.md), summary.md (seed-style tables) and PNG plots.

Task and metric names are data: tables come from `results["stages"]`, the matrices in `results["metrics"]` and a
task -> headline metric mapping (`results["task_metrics"]`, else `DEFAULT_TASK_METRICS`, else 'acc'), so the
3-stage VOC/COCO/Imagenette run and 17-task MNIST protocols share this code. Matrices are in percent.
The PNG plots are drawn by clflax/reporting/plots.py.
"""
import json
import math
import numbers
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from clflax.runtime import files

DEFAULT_TASK_METRICS = {"seg": "miou", "det": "map", "cls": "top1"}
DEFAULT_TASK_TITLES = {"seg": "VOC segmentation", "det": "COCO detection", "cls": "Imagenette classification"}
METRIC_LABELS = {"miou": "mIoU", "map": "mAP", "ap50": "AP50", "ap75": "AP75", "top1": "Top-1", "top5": "Top-5",
                 "acc": "Accuracy", "pixel_acc": "Pixel accuracy", "image_map": "Image-level mAP",
                 "headline": "Headline"}
SUMMARY_KEYS = ("acc", "bwt", "forgetting")
CRITERION_KEYS = ("baseline", "final", "drop", "passed")

# ------------------------------------------------------------------------------------------------ validation


def _is_number(x, allow_none=True) -> bool:
  if x is None:
    return allow_none
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_vector(values, length: int, where: str) -> None:
  if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
    raise ValueError(f"{where} must be a list, got {type(values).__name__}")
  if len(values) != length:
    raise ValueError(f"{where} has {len(values)} entries, expected {length} (one per stage)")
  for k, v in enumerate(values):
    if not _is_number(v):
      raise ValueError(f"{where}[{k}] is not a number: {v!r}")


def validate_results(d: Any) -> None:
  """Raises ValueError naming the first missing or malformed key of a results dict; returns None if valid."""
  if not isinstance(d, Mapping):
    raise ValueError(f"results must be a dict, got {type(d).__name__}")
  for key in ("config", "stages", "metrics", "summary", "criterion", "params", "timing"):
    if key not in d:
      raise ValueError(f"results lack the key '{key}'")
  for key in ("config", "metrics", "summary", "criterion", "timing"):
    if not isinstance(d[key], Mapping):
      raise ValueError(f"results['{key}'] must be a dict, got {type(d[key]).__name__}")
  stages = d["stages"]
  if (isinstance(stages, str) or not isinstance(stages, Sequence) or not stages
      or not all(isinstance(s, str) and s for s in stages) or len(set(stages)) != len(stages)):
    raise ValueError(f"results['stages'] must be a non-empty list of distinct task names, got {stages!r}")
  t = len(stages)
  if not d["metrics"]:
    raise ValueError("results['metrics'] is empty")
  for name, matrix in d["metrics"].items():
    if isinstance(matrix, (str, bytes)) or not isinstance(matrix, (Sequence, np.ndarray)) or len(matrix) != t:
      raise ValueError(f"results['metrics']['{name}'] must be a {t} x {t} matrix (rows = stages)")
    for i, row in enumerate(matrix):
      _check_vector(row, t, f"results['metrics']['{name}'][{i}]")
  for name, s in _per_metric_summary(d["summary"]).items():
    if not isinstance(s, Mapping):
      raise ValueError(f"results['summary']['{name}'] must be a dict with {SUMMARY_KEYS}")
    for key in SUMMARY_KEYS:
      if key not in s or not _is_number(s[key]):
        raise ValueError(f"results['summary']['{name}'] lacks a number for '{key}'")
  for task, entry in d["criterion"].items():
    if task not in stages:
      raise ValueError(f"results['criterion'] names '{task}', which is not a stage of {list(stages)}")
    if not isinstance(entry, Mapping) or any(k not in entry for k in CRITERION_KEYS):
      raise ValueError(f"results['criterion']['{task}'] must hold {CRITERION_KEYS}")
    if not isinstance(entry["passed"], (bool, np.bool_)):
      raise ValueError(f"results['criterion']['{task}']['passed'] must be a bool")
  if not isinstance(d["params"], numbers.Integral) or isinstance(d["params"], bool) or d["params"] < 0:
    raise ValueError(f"results['params'] must be a non-negative int, got {d['params']!r}")
  if "stage_seconds" in d["timing"]:
    _check_vector(d["timing"]["stage_seconds"], t, "results['timing']['stage_seconds']")
  if "stage_titles" in d:
    titles = d["stage_titles"]
    if isinstance(titles, str) or len(titles) != t or not all(isinstance(x, str) for x in titles):
      raise ValueError(f"results['stage_titles'] must hold {t} strings, got {titles!r}")
  baseline = d.get("baseline", {})
  if not isinstance(baseline, Mapping):
    raise ValueError("results['baseline'] must be a dict: {metric: [score per task]} or {task: {metric: score}}")
  for key, values in baseline.items():
    if isinstance(values, Mapping):  # {task: {metric: score}}
      if key not in stages:
        raise ValueError(f"results['baseline'] names '{key}', which is not a stage of {list(stages)}")
      for metric, v in values.items():
        if not _is_number(v):
          raise ValueError(f"results['baseline']['{key}']['{metric}'] is not a number: {v!r}")
    else:
      _check_vector(values, t, f"results['baseline']['{key}']")
  for task in stages:
    task_metric(d, task)  # every task needs a headline metric


def _baseline_row(results: Mapping[str, Any], metric: str) -> Optional[list]:
  """The untrained scores of `metric` per task, from either baseline layout; None when absent."""
  baseline, stages = results.get("baseline") or {}, results["stages"]
  if metric in baseline and not isinstance(baseline[metric], Mapping):
    return list(baseline[metric])
  if any(isinstance(baseline.get(s), Mapping) and metric in baseline[s] for s in stages):
    return [baseline[s].get(metric) if isinstance(baseline.get(s), Mapping) else None for s in stages]
  return None


def _per_metric_summary(summary: Mapping[str, Any]) -> Mapping[str, Any]:
  """{metric: continual_summary}; a single flat continual_summary (numbers at the top) becomes {'headline': it}."""
  if any(_is_number(summary.get(k), allow_none=False) for k in SUMMARY_KEYS):
    return {"headline": summary}
  return summary


# ------------------------------------------------------------------------------------------------ writing


def _jsonable(x):
  """NumPy / tuples -> JSON types; NaN and inf -> null (strict JSON has no NaN)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, np.ndarray) or (hasattr(x, "__array__") and not isinstance(x, numbers.Number)):
    return _jsonable(np.asarray(x).tolist())  # also jax arrays
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, numbers.Integral):
    return int(x)
  if isinstance(x, numbers.Real):
    return float(x) if math.isfinite(x) else None
  return x


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
  """Validates `results` and writes workdir/results.json atomically; returns its path."""
  validate_results(results)
  try:
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False)
  except TypeError as e:
    raise ValueError(f"results hold a value JSON cannot store: {e}") from None
  return files.write_text_atomically(os.path.join(workdir, "results.json"), text + "\n")


def write_summary(workdir: str, results: Mapping[str, Any]) -> str:
  """Writes workdir/summary.md (see `render_summary`) atomically; returns its path."""
  return files.write_text_atomically(os.path.join(workdir, "summary.md"), render_summary(results))


# ------------------------------------------------------------------------------------------------ summary.md


def task_metric(results: Mapping[str, Any], task: str) -> str:
  """`task`'s headline metric: results['task_metrics'] (or 'headline_metrics'), DEFAULT_TASK_METRICS, 'acc',
  or the only metric there is."""
  metrics = results["metrics"]
  explicit = results.get("task_metrics") or results.get("headline_metrics") or {}
  for candidate in (explicit.get(task), DEFAULT_TASK_METRICS.get(task), "acc"):
    if candidate in metrics:
      return candidate
  if len(metrics) == 1:
    return next(iter(metrics))
  raise ValueError(f"no headline metric for task '{task}': add results['task_metrics']['{task}'] "
                   f"(one of {sorted(metrics)})")


def metric_label(metric: str) -> str:
  return METRIC_LABELS.get(metric, metric)


def stage_titles(results: Mapping[str, Any]) -> list:
  titles = results.get("stage_titles") or [DEFAULT_TASK_TITLES.get(s, s) for s in results["stages"]]
  return [f"Stage {i + 1}: {title}" for i, title in enumerate(titles)]


def _fmt(x, digits=1, signed=False) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  x = round(float(x), digits) + 0.0  # no "-0.0"
  text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
  return text.replace("-", "−")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list:
  """Markdown table; `align` holds 'l' or 'r' per column."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _tolerance(results: Mapping[str, Any]) -> float:
  config = results["config"]
  for value in (results.get("criterion_tolerance"), config.get("eval.criterion_tolerance"),
                config.get("eval", {}).get("criterion_tolerance") if isinstance(config.get("eval"), Mapping)
                else None):
    if value is not None:
      return float(value)
  return 5.0


class _View(NamedTuple):
  """What every summary section needs, computed once."""
  stages: list
  titles: list  # "Stage k: <title>"
  names: list  # headline metric of each task
  r: np.ndarray  # [T, T] headline scores: column j in task j's metric
  tol: float
  headline: str  # label of the headline matrix


def _view(results: Mapping[str, Any]) -> _View:
  stages = list(results["stages"])
  names = [task_metric(results, task) for task in stages]
  r = np.stack([np.asarray(results["metrics"][m], np.float64)[:, j] for j, m in enumerate(names)], axis=1)
  labels = list(dict.fromkeys(metric_label(m) for m in names))
  headline = labels[0] if len(labels) == 1 else "Headline (" + ", ".join(labels) + ")"
  return _View(stages, stage_titles(results), names, r, _tolerance(results), headline)


def _failed(results, v: _View) -> list:
  return [s for s in v.stages if s in results["criterion"] and not results["criterion"][s]["passed"]]


def _progression(results, v: _View) -> list:
  t, distinct = len(v.stages), len(set(v.names)) == len(v.names)
  columns = [f"{metric_label(m)} (%)" if distinct else f"{s} (%)" for s, m in zip(v.stages, v.names)]
  out = ["## Stage-wise progression", ""]
  if not distinct:
    out += [f"Columns: {v.headline} (%) of each task.", ""]
  rows = []
  for i in range(t):
    # A task not learned yet shows "—", not its untrained score (chance level, or 0 where the seed printed 0).
    cells = [_fmt(v.r[i, j]) if j <= i else "—" for j in range(t)]
    dropped = [f"{v.stages[j]} {_fmt(v.r[i, j] - v.r[j, j], signed=True)}" for j in range(i)
               if v.r[i, j] < v.r[j, j] - v.tol]  # False for NaN
    rows.append([v.titles[i]] + cells
                + [f"learned {v.stages[i]}" + (f"; below target: {', '.join(dropped)}" if dropped else "")])
  failed = _failed(results, v)
  verdict = "**FAILED** (forgot " + ", ".join(failed) + ")" if failed else "**PASSED** (all tasks kept)"
  rows.append(["**Final**"] + [_fmt(x) for x in v.r[-1]] + [verdict])
  return out + _table(["Stage"] + columns + ["Status"], rows, "l" + "r" * t + "l") + [""]


def _criterion(results, v: _View) -> list:
  criterion, rows = results["criterion"], []
  for s, m in zip(v.stages, v.names):
    if s in criterion:
      c = criterion[s]
      target = None if c["baseline"] is None else c["baseline"] - v.tol
      change = None if c["drop"] is None else -c["drop"]
      rows.append([s, metric_label(m), _fmt(c["baseline"]), f"≥ {_fmt(target)}", _fmt(c["final"]),
                   _fmt(change, signed=True), "passed" if c["passed"] else "**failed**"])
  failed = _failed(results, v)
  verdict = (f"**Verdict: {'FAILED' if failed else 'PASSED'}** — {len(rows) - len(failed)}/{len(rows)} tasks "
             f"within {v.tol:g} points of their own-stage baseline" + (f"; failed: {', '.join(failed)}." if failed
                                                                         else "."))
  return ([f"## Forgetting criterion (final ≥ own-stage baseline − {v.tol:g} points)", ""]
          + _table(["Task", "Metric", "Baseline (%)", "Target (%)", "Achieved (%)", "Change (points)", "Result"],
                   rows, "llrrrrl") + ["", verdict, ""])


def _continual(results, v: _View) -> list:
  rows = [[f"{v.headline if m == 'headline' else metric_label(m)} (%)", _fmt(s["acc"]), _fmt(s["bwt"], signed=True),
           _fmt(s.get("fwt"), signed=True), _fmt(s["forgetting"])]
          for m, s in _per_metric_summary(results["summary"]).items()]
  return (["## Continual summary", "",
           "ACC: mean final score; BWT: mean (final − own-stage score); FWT: mean (score just before a task's "
           "stage − untrained baseline); forgetting: mean drop from the best earlier score. In points.", ""]
          + _table(["Metric", "ACC", "BWT", "FWT", "Forgetting"], rows, "lrrrr") + [""])


def _matrices(results, v: _View) -> list:
  t = len(v.stages)
  base = [(_baseline_row(results, m) or [None] * t)[j] for j, m in enumerate(v.names)]
  tables = [(v.headline, v.r, base, ())]
  tables += [(metric_label(m), np.asarray(x, np.float64), _baseline_row(results, m), m)
             for m, x in results["metrics"].items()]
  out = ["## Score matrices", "", "Row: after training stage; column: evaluated task (tasks without the metric "
         "left out).", ""]
  for label, matrix, base, metric in tables:
    keep = [j for j in range(t) if np.isfinite(matrix[:, j]).any()]
    if all(v.names[j] == metric for j in keep):
      continue  # its columns are all in the headline table
    rows = [] if base is None else [["before stage 1"] + [_fmt(base[j]) for j in keep]]
    rows += [[f"after {v.stages[i]}"] + [_fmt(matrix[i, j]) for j in keep] for i in range(t)]
    out += [f"### {label} (%)", ""] + _table([""] + [v.stages[j] for j in keep], rows, "l" + "r" * len(keep))
    out += [""]
  return out


def _cost(results, v: _View) -> list:
  timing = results["timing"]
  out = ["## Parameters and time", "", f"Parameters: {results['params']:,}", ""]
  if "stage_seconds" in timing:
    secs = list(timing["stage_seconds"])
    rows = [[title, _fmt(x)] for title, x in zip(v.titles, secs)]
    rows.append(["**Total**", _fmt(sum(x for x in secs if x is not None))])
    out += _table(["Stage", "Time (s)"], rows, "lr") + [""]
  for key, value in timing.items():
    if key != "stage_seconds":
      if isinstance(value, Mapping):
        value = ", ".join(f"{k} {_fmt(x) if _is_number(x, False) else x}" for k, x in value.items())
      out.append(f"- {key}: {_fmt(value) if _is_number(value, False) else value}")
  return out + [""]


def render_summary(results: Mapping[str, Any]) -> str:
  """The seed-style markdown report: progression, forgetting criterion, continual summary, matrices, cost."""
  validate_results(results)
  v = _view(results)
  facts = [f"tasks: {' → '.join(v.stages)}", f"parameters: {results['params']:,}"]
  strategy = results["config"].get("strategy.names", results["config"].get("strategy"))
  if isinstance(strategy, (str, list, tuple)):
    facts.append(f"strategy: {strategy if isinstance(strategy, str) else ' + '.join(map(str, strategy))}")
  out = ["# Continual-learning results", "", "; ".join(facts), ""]
  if "before_balance" in results:  # The last row is after the balancing fine-tune.
    steps = results["config"].get("train.balance_finetune_steps", "?")
    before = ", ".join(f"{s} {results['before_balance'][s][task_metric(results, s)]:.2f}" for s in results["stages"])
    out += [f"The last stage's row is after a balancing fine-tune of {steps} steps on all tasks' memories; "
            f"before it: {before}.", ""]
  for section in (_progression, _criterion, _continual, _matrices, _cost):
    out += section(results, v)
  return "\n".join(out)


def console_summary(results: Mapping[str, Any]) -> str:
  """The part of summary.md a run prints when it ends: the stage-wise table and the criterion with its verdict."""
  validate_results(results)
  v = _view(results)
  return "\n".join(_progression(results, v) + _criterion(results, v)).strip()
