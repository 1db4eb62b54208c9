r"""Compare runs: mean ± std over seeds of each strategy's final scores, ACC, BWT, forgetting (and FWT).

  python -m clflax.reporting.compare runs/*                      # workdirs, globs, a folder of workdirs or results.json files
  python -m clflax.reporting.compare runs/ewc_* runs/agem_* --group-by strategy.ewc.strength --out comparison

Runs are grouped by `strategy.names` (plus any `--group-by` config keys); every other config difference within a
group (e.g. the seed) is averaged over. Runs with different task sequences are compared separately. Writes
`compare.md` (the printed tables), `compare.json` (every number) and PNGs into `--out`. A workdir without
results.json (a run still in progress) or with a corrupt / invalid one is listed in a note, never a crash.
Spread is the sample standard deviation (n − 1); a group of one run shows no ±. Scores are in percent.
"""
import argparse
import glob
import json
import os
import sys
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from clflax import metrics
from clflax.reporting import report
from clflax.runtime import files

SUMMARY = (("acc", "ACC", True), ("bwt", "BWT", True), ("forgetting", "Forgetting", False), ("fwt", "FWT", True))
_RUN_MARKERS = ("results.json", "config.json", "checkpoints")
MAX_TASK_COLUMNS = 6  # longer task sequences (17 permuted-MNIST tasks) keep per-task finals out of the table


class Run(NamedTuple):
  """One finished run, reduced to what the comparison needs."""
  path: str  # its results.json
  config: dict  # flattened, dotted keys
  stages: tuple
  names: tuple  # headline metric of each task
  matrix: np.ndarray  # [T, T] headline scores, matrix[i, j] = task j after stage i (NaN: missing)
  summary: dict  # acc, bwt, forgetting (+ fwt with a baseline) of `matrix`
  passed: Optional[bool]  # every task met the forgetting criterion


# ------------------------------------------------------------------------------------------------ finding runs


def _is_run_dir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, m)) for m in _RUN_MARKERS)


def find_runs(patterns: Sequence[str]) -> tuple:
  """(results.json paths, run folders without one, notes) for workdirs, globs, folders holding workdirs and
  results files; duplicates are dropped."""
  found, pending, notes = [], [], []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      notes.append(f"`{pattern}` matches nothing.")
    for path in matches:
      if os.path.isfile(path):
        found.append(path)
      elif not os.path.isdir(path):
        notes.append(f"`{path}`: no such file or directory.")
      else:
        dirs = [path] if _is_run_dir(path) else [os.path.join(path, d) for d in sorted(os.listdir(path))
                                                  if _is_run_dir(os.path.join(path, d))]
        if not dirs:
          notes.append(f"`{path}`: no run here (no results.json, config.json or checkpoints).")
        for d in dirs:
          results = os.path.join(d, "results.json")
          (found if os.path.exists(results) else pending).append(results if os.path.exists(results) else d)
  return _unique(found), _unique(pending), notes


def _unique(paths: Sequence[str]) -> list:
  """`paths` without repeats of one file (first spelling kept, order kept)."""
  seen, out = set(), []
  for p in paths:
    if os.path.realpath(p) not in seen:
      seen.add(os.path.realpath(p))
      out.append(p)
  return out


def progress_note(workdir: str) -> str:
  """'<workdir>: no results.json yet …', with the stages finished when a checkpoint's JSON meta says so."""
  text = f"`{workdir}`: no results.json yet (run in progress, stopped or failed)"
  metas = []
  for path in glob.glob(os.path.join(workdir, "checkpoints", "**", "meta", "metadata"), recursive=True):
    try:
      with open(path, encoding="utf-8") as f:
        metas.append(json.load(f))
    except (OSError, ValueError):
      continue
  metas = [m for m in metas if isinstance(m, dict) and isinstance(m.get("rows"), list)]
  if not metas:
    return text + "; left out."
  latest = max(metas, key=lambda m: m.get("saves", 0))
  total = ""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      total = f"/{len(json.load(f)['tasks'])}"
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return text + f"; {len(latest['rows'])}{total} stages finished at its latest checkpoint; left out."


# ------------------------------------------------------------------------------------------------ loading


def _baseline(results: Mapping[str, Any], stages, names) -> Optional[np.ndarray]:
  """Untrained headline score of each task from either baseline layout; None unless every task has one."""
  b = results.get("baseline") or {}
  values = []
  for j, (task, metric) in enumerate(zip(stages, names)):
    if isinstance(b.get(task), Mapping):
      values.append(b[task].get(metric))
    elif metric in b and not isinstance(b[metric], Mapping):
      values.append(b[metric][j])
    else:
      values.append(None)
  return None if any(v is None for v in values) else np.asarray(values, np.float64)


def load_run(path: str) -> Run:
  """Reads and checks one results.json; ValueError with a one-line reason when it cannot be used."""
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"unreadable ({e})") from None
  report.validate_results(results)  # ValueError naming the bad key
  stages = tuple(results["stages"])
  names = tuple(report.task_metric(results, task) for task in stages)
  matrix = np.stack([np.asarray(results["metrics"][m], np.float64)[:, j] for j, m in enumerate(names)], axis=1)
  summary = metrics.continual_summary(matrix, _baseline(results, stages, names))
  criterion = results["criterion"]
  passed = all(c["passed"] for c in criterion.values()) if criterion else None
  return Run(path, dict(results["config"]), stages, names, matrix, summary, passed)


# ------------------------------------------------------------------------------------------------ aggregation


def _show(value) -> str:
  if isinstance(value, (list, tuple)):
    return "+".join(map(str, value)) if value else "(none)"
  return str(value)


def _inactive(config: Mapping[str, Any], key: str) -> bool:
  """True for `strategy.<s>.*` keys of a strategy the run does not use (every config carries every section)."""
  parts, names = key.split("."), config.get("strategy.names")
  return len(parts) > 2 and parts[0] == "strategy" and isinstance(names, (list, tuple)) and parts[1] not in names


def group_name(config: Mapping[str, Any], group_by: Sequence[str] = ()) -> str:
  name = _show(config.get("strategy.names", config.get("strategy", "(no strategy)")))
  return ", ".join([name] + [f"{k}={_show(config.get(k, '(absent)'))}" for k in group_by
                             if not _inactive(config, k)])


def stats(values) -> dict:
  """mean, sample std (n − 1; None for one value), n and the values; NaN values are left out."""
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  if not v:
    return {"mean": None, "std": None, "n": 0, "values": []}
  return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v),
          "values": v}


def _cellwise(matrices: np.ndarray, key: str) -> list:
  """Mean or std (0 for one run) of each cell over the runs' matrices; NaN where no run has the cell."""
  t = matrices.shape[1:]
  cells = [stats(matrices[:, i, j])[key] for i in range(t[0]) for j in range(t[1])]
  fill = 0.0 if key == "std" else float("nan")
  return np.asarray([fill if c is None else c for c in cells], np.float64).reshape(t).tolist()


def _differing(configs: Sequence[Mapping[str, Any]], ignore: Sequence[str]) -> list:
  keys = sorted(set().union(*configs) - set(ignore))
  return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs
                                  if not _inactive(c, k)}) > 1]


def aggregate(runs: Sequence[Run], group_by: Sequence[str] = ()) -> list:
  """One entry per task sequence ('benchmark'), each with its groups' statistics (see compare.json)."""
  benchmarks = {}
  for run in runs:
    benchmarks.setdefault((run.stages, run.names), []).append(run)
  out = []
  for (stages, names), members in benchmarks.items():
    groups = {}
    for run in members:
      groups.setdefault(group_name(run.config, group_by), []).append(run)
    entries = []
    for name in sorted(groups):
      rs = groups[name]
      matrices = np.stack([r.matrix for r in rs])
      seeds = [r.config.get("seed") for r in rs]
      entry = {"name": name, "runs": [r.path for r in rs], "seeds": seeds, "n": len(rs),
               "final": {task: stats(matrices[:, -1, j]) for j, task in enumerate(stages)},
               **{key: stats([r.summary.get(key) for r in rs]) for key, _, _ in SUMMARY},
               "passed": sum(r.passed is True for r in rs), "judged": sum(r.passed is not None for r in rs),
               "matrix_mean": _cellwise(matrices, "mean"), "matrix_std": _cellwise(matrices, "std"),
               "differ_in": _differing([r.config for r in rs], ["seed", *group_by]),
               "duplicate_seeds": sorted({s for s in seeds if seeds.count(s) > 1}, key=str)}
      entries.append(entry)
    out.append({"stages": list(stages), "metrics": list(names), "groups": entries})
  return out


# ------------------------------------------------------------------------------------------------ markdown


def _pm(s: Mapping[str, Any], signed: bool = False) -> str:
  if s["mean"] is None:
    return "n/a"
  text = report._fmt(s["mean"], signed=signed)
  return text if s["std"] is None else f"{text} ± {report._fmt(s['std'])}"


def _best(groups, get, higher: bool) -> Optional[float]:
  """The best mean of a column when one group alone has it (a tie marks nothing)."""
  means = [get(g)["mean"] for g in groups if get(g)["mean"] is not None]
  best = (max if higher else min)(means) if len(means) > 1 else None
  return best if means.count(best) == 1 else None


def render_markdown(benchmarks: Sequence[Mapping[str, Any]], notes: Sequence[str], group_by=()) -> str:
  n = sum(g["n"] for b in benchmarks for g in b["groups"])
  by = " + ".join(["strategy"] + list(group_by))
  out = [f"# Comparison of {n} run{'s' * (n != 1)}", "",
         f"Grouped by {by}; mean ± sample std (n − 1) over each group's runs; scores in %, BWT / forgetting / FWT "
         "in points. Best mean per column in bold. Final: each task's headline score after the last stage.", ""]
  for b in benchmarks:
    groups, stages = b["groups"], b["stages"]
    keys = [k for k in SUMMARY if any(g[k[0]]["mean"] is not None for g in groups)]
    columns = [(f"{t} {report.metric_label(m)} (%)", (lambda g, t=t: g["final"][t]), True, False)
               for t, m in zip(stages, b["metrics"])] if len(stages) <= MAX_TASK_COLUMNS else []
    columns += [(label, (lambda g, k=k: g[k]), higher, k in ("bwt", "fwt")) for k, label, higher in keys]
    header = ["Group", "n", "Seeds"] + [c[0] for c in columns] + ["Criterion passed"]
    rows = []
    for g in groups:
      cells = []
      for _, get, higher, signed in columns:
        text, best = _pm(get(g), signed), _best(groups, get, higher)
        cells.append(f"**{text}**" if best is not None and get(g)["mean"] == best else text)
      judged = f"{g['passed']}/{g['judged']}" if g["judged"] else "n/a"
      rows.append([g["name"], str(g["n"]), ", ".join(map(str, g["seeds"]))] + cells + [judged])
    out += [f"## {' → '.join(stages)}", ""] + report._table(header, rows, "lrl" + "r" * (len(columns) + 1)) + [""]
    if len(stages) > MAX_TASK_COLUMNS:
      out += [f"{len(stages)} tasks: each task's final score is in compare.json and the final_scores plot.", ""]
  notes = list(notes)
  for b in benchmarks:
    for g in b["groups"]:
      if g["differ_in"]:
        shown = ", ".join(g["differ_in"][:6]) + (", …" if len(g["differ_in"]) > 6 else "")
        notes.append(f"Runs of '{g['name']}' differ in {shown} (averaged together; --group-by splits them).")
      for seed in g["duplicate_seeds"]:
        same = [p for p, s in zip(g["runs"], g["seeds"]) if s == seed]
        notes.append(f"'{g['name']}' has {len(same)} runs with seed {seed}: {', '.join(f'`{p}`' for p in same)}.")
  if len(benchmarks) > 1:
    notes.append(f"{len(benchmarks)} different task sequences: compared separately.")
  if notes:
    out += ["## Notes", ""] + [f"- {x}" for x in notes] + [""]
  return "\n".join(out)


# ------------------------------------------------------------------------------------------------ plots


def write_plots(benchmarks: Sequence[Mapping[str, Any]], out: str) -> list:
  """final_scores, summary, matrices and evolution PNGs per task sequence (suffixed _2, _3 … after the first)."""
  from clflax.reporting import plots  # pylint: disable=g-import-not-at-top
  paths = []
  for k, b in enumerate(benchmarks):
    suffix = "" if k == 0 else f"_{k + 1}"
    groups, stages, names = b["groups"], b["stages"], b["metrics"]
    tasks = [f"{t} ({report.metric_label(m)})" for t, m in zip(stages, names)]
    paths.append(plots.plot_group_bars(
        os.path.join(out, f"final_scores{suffix}.png"), tasks,
        {g["name"]: [g["final"][t]["values"] for t in stages] for g in groups},
        "Final score of each task (after the last stage)", "final score"))
    keys = [(key, label) for key, label, _ in SUMMARY if any(g[key]["n"] for g in groups)]
    paths.append(plots.plot_group_bars(
        os.path.join(out, f"summary{suffix}.png"), [label for _, label in keys],
        {g["name"]: [g[key]["values"] for key, _ in keys] for g in groups},
        "Continual summary: ACC (higher is better), BWT, FWT (higher), forgetting (lower)",
        "ACC (%); BWT, forgetting, FWT (points)", unit=""))
    paths.append(plots.plot_matrices(
        os.path.join(out, f"matrices{suffix}.png"), {f"{g['name']} (n={g['n']})": g["matrix_mean"] for g in groups},
        [f"after {s}" for s in stages], tasks, "Mean headline score of each task after each stage"))
    paths.append(plots.plot_group_evolution(
        os.path.join(out, f"evolution{suffix}.png"), {g["name"]: (g["matrix_mean"], g["matrix_std"]) for g in groups},
        tasks, [f"{report.metric_label(m)} (%)" for m in names], stages))
  return paths


# ------------------------------------------------------------------------------------------------ entry point


def compare(patterns: Sequence[str], out: str = "comparison", group_by: Sequence[str] = (), plot: bool = True):
  """Finds, loads, groups and writes everything; returns (markdown, the compare.json dict)."""
  found, pending, notes = find_runs(patterns)
  notes += [progress_note(d) for d in pending]
  runs = []
  for path in found:
    try:
      runs.append(load_run(path))
    except ValueError as e:
      notes.append(f"`{path}`: {e}; left out.")
  benchmarks = aggregate(runs, group_by)
  notes += [f"--group-by key '{k}' is in no run's config." for k in group_by
            if runs and not any(k in r.config for r in runs)]
  text = render_markdown(benchmarks, notes, group_by)
  data = {"group_by": ["strategy.names", *group_by], "benchmarks": benchmarks, "notes": notes,
          "left_out": len(pending) + len(found) - len(runs)}
  if runs:
    os.makedirs(out, exist_ok=True)
    files.write_text_atomically(os.path.join(out, "compare.md"), text)
    files.write_text_atomically(os.path.join(out, "compare.json"),
                             json.dumps(report._jsonable(data), indent=2, allow_nan=False) + "\n")
    data["plots"] = write_plots(benchmarks, out) if plot else []
  return text, data


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clflax.reporting.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", help="workdirs, globs, folders of workdirs or results.json files")
  parser.add_argument("--group-by", default="", help="comma-separated config keys that also split groups, "
                      "e.g. strategy.ewc.strength,train.lr")
  parser.add_argument("--out", default="comparison", help="folder for compare.md, compare.json and the PNGs")
  parser.add_argument("--no-plots", action="store_true", help="tables only")
  args = parser.parse_args(argv)
  group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
  text, data = compare(args.paths, args.out, group_by, plot=not args.no_plots)
  print(text)
  if not data["benchmarks"]:
    print("No finished run to compare (no readable results.json).", file=sys.stderr)
    return 1
  print(f"Wrote {os.path.join(args.out, 'compare.md')}, compare.json and {len(data['plots'])} plots.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
