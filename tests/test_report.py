"""results.json validation and atomic writing, summary.md tables, and the PNG plots."""
import json
import os
import struct

import numpy as np
import pytest

from clflax.reporting import plots
from clflax.reporting import report

NAN = float("nan")


def _results():
  """A 3-stage run shaped like the trainer's; every number is hand-chosen."""
  return {
      "config": {"strategy.names": ["agem"], "eval.criterion_tolerance": 5.0},
      "stages": ["seg", "det", "cls"],
      "stage_titles": ["VOC segmentation", "COCO detection", "Imagenette classification"],
      "metrics": {
          "miou": [[60.0, NAN, NAN], [57.5, NAN, NAN], [50.0, NAN, NAN]],
          "map": [[NAN, 1.0, NAN], [NAN, 20.0, NAN], [NAN, 17.0, NAN]],
          "top1": [[NAN, NAN, 9.0], [NAN, NAN, 11.0], [NAN, NAN, 80.0]],
          "ap50": [[NAN, 0.5, NAN], [NAN, 35.0, NAN], [NAN, 30.0, NAN]],
      },
      "baseline": {"seg": {"miou": 3.0}, "det": {"map": 0.5}, "cls": {"top1": 10.0}},
      "summary": {"headline": {"acc": 49.0, "bwt": -6.5, "fwt": 0.75, "forgetting": 6.5}},
      "criterion": {"seg": {"baseline": 60.0, "final": 50.0, "drop": 10.0, "passed": False},
                    "det": {"baseline": 20.0, "final": 17.0, "drop": 3.0, "passed": True},
                    "cls": {"baseline": 80.0, "final": 80.0, "drop": 0.0, "passed": True}},
      "params": 4012345,
      "timing": {"stage_seconds": [120.0, 300.5, 60.25], "total_seconds": 480.75},
  }


def _row(text, first_cell):
  """Cells of the markdown table row whose first cell is `first_cell`."""
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0] == first_cell:
      return cells[1:]
  raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_validate_accepts_the_trainer_shape_and_flat_forms():
  report.validate_results(_results())
  flat = _results()
  flat["summary"] = {"acc": 1.0, "bwt": 0.0, "forgetting": 0.0}
  flat["baseline"] = {"miou": [1.0, NAN, NAN]}
  report.validate_results(flat)


@pytest.mark.parametrize("key", ["config", "stages", "metrics", "summary", "criterion", "params", "timing"])
def test_validate_names_missing_keys(key):
  d = _results()
  del d[key]
  with pytest.raises(ValueError, match=f"'{key}'"):
    report.validate_results(d)


@pytest.mark.parametrize("path, value, message", [
    (("metrics", "map"), [[1.0, 2.0, 3.0]], r"metrics'\]\['map'\] must be a 3 x 3"),
    (("metrics", "miou"), [[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], r"\['miou'\]\[0\] has 2 entries"),
    (("metrics", "top1"), [[1.0, "x", 3.0]] * 3, r"\['top1'\]\[0\]\[1\] is not a number"),
    (("params",), 4.5, "params"),
    (("params",), True, "params"),
    (("stages",), ["seg", "seg", "cls"], "distinct"),
    (("criterion", "det"), {"baseline": 1.0, "final": 1.0, "drop": 0.0}, r"\['det'\] must hold"),
    (("criterion", "det", "passed"), "yes", "bool"),
    (("summary", "headline"), {"acc": 1.0, "bwt": 0.0}, "forgetting"),
    (("timing", "stage_seconds"), [1.0, 2.0], "stage_seconds"),
    (("baseline",), {"bogus": {"miou": 1.0}}, "bogus"),
])
def test_validate_rejects_malformed_values(path, value, message):
  d = _results()
  target = d
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    report.validate_results(d)


def test_validate_needs_a_headline_metric_per_task():
  d = _results()
  d["stages"] = ["seg", "det", "extra"]
  d["criterion"], d["baseline"] = {}, {}
  with pytest.raises(ValueError, match="'extra'"):
    report.validate_results(d)
  d["task_metrics"] = {"extra": "top1"}
  report.validate_results(d)


def test_write_results_is_strict_json_and_atomic(tmp_path):
  d = _results()
  d["extra_array"] = np.arange(3, dtype=np.int32)
  d["timing"]["per_task"] = {"seg": np.float32(1.5)}
  path = report.write_results(str(tmp_path), d)
  assert path == str(tmp_path / "results.json")
  text = (tmp_path / "results.json").read_text()
  loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert loaded["metrics"]["miou"][0] == [60.0, None, None]  # NaN -> null
  assert loaded["extra_array"] == [0, 1, 2] and loaded["params"] == 4012345
  assert loaded["criterion"]["seg"]["passed"] is False and loaded["timing"]["per_task"] == {"seg": 1.5}
  report.validate_results(loaded)  # what was written reads back as valid
  # A rejected dict leaves the previous file untouched and no temporary file behind.
  bad = _results()
  del bad["timing"]
  with pytest.raises(ValueError, match="timing"):
    report.write_results(str(tmp_path), bad)
  assert (tmp_path / "results.json").read_text() == text
  bad = _results()
  bad["config"]["odd"] = object()
  with pytest.raises(ValueError, match="JSON cannot store"):
    report.write_results(str(tmp_path), bad)
  assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_summary_progression_table():
  text = report.render_summary(_results())
  header = _row(text, "Stage")
  assert header == ["mIoU (%)", "mAP (%)", "Top-1 (%)", "Status"]
  # After each stage: learned tasks show their score, tasks not yet learned a dash.
  assert _row(text, "Stage 1: VOC segmentation")[:3] == ["60.0", "—", "—"]
  assert _row(text, "Stage 2: COCO detection")[:3] == ["57.5", "20.0", "—"]
  stage3 = _row(text, "Stage 3: Imagenette classification")
  assert stage3[:3] == ["50.0", "17.0", "80.0"]
  assert "seg −10.0" in stage3[3]  # 50 < 60 - 5: flagged; det (17 >= 15) is not
  assert "det" not in stage3[3].split("below target")[-1]
  final = _row(text, "**Final**")
  assert final[:3] == ["50.0", "17.0", "80.0"] and "FAILED" in final[3]


def test_summary_criterion_summary_and_cost():
  text = report.render_summary(_results())
  assert _row(text, "seg") == ["mIoU", "60.0", "≥ 55.0", "50.0", "−10.0", "**failed**"]
  assert _row(text, "det") == ["mAP", "20.0", "≥ 15.0", "17.0", "−3.0", "passed"]
  assert _row(text, "cls") == ["Top-1", "80.0", "≥ 75.0", "80.0", "+0.0", "passed"]
  assert "**Verdict: FAILED** — 2/3 tasks within 5 points" in text
  assert _row(text, "Headline (mIoU, mAP, Top-1) (%)") == ["49.0", "−6.5", "+0.8", "6.5"]
  assert _row(text, "before stage 1") == ["3.0", "0.5", "10.0"]  # headline baseline (untrained) row
  assert _row(text, "after det") == ["57.5", "20.0", "11.0"]
  # A secondary metric gets its own table, with only the tasks that have it.
  ap50 = text.split("### AP50 (%)")[1]
  assert _row(ap50, "") == ["det"] and _row(ap50, "after cls") == ["30.0"]
  assert "Parameters: 4,012,345" in text
  assert _row(text, "**Total**") == ["480.8"]
  assert _row(text.split("## Parameters and time")[1], "Stage 2: COCO detection") == ["300.5"]
  assert "- total_seconds: 480.8" in text


def test_summary_verdict_passes_and_tolerance_comes_from_config(tmp_path):
  d = _results()
  d["config"]["eval.criterion_tolerance"] = 12.0
  d["criterion"]["seg"]["passed"] = True
  text = report.render_summary(d)
  assert "**Verdict: PASSED** — 3/3 tasks within 12 points" in text
  assert _row(text, "seg")[1:3] == ["60.0", "≥ 48.0"]
  assert "below target" not in text
  report.write_summary(str(tmp_path), d)
  assert (tmp_path / "summary.md").read_text() == text


def test_summary_with_17_tasks_and_acc():
  t = 17
  rng = np.random.default_rng(0)
  matrix = np.tril(rng.uniform(80, 99, (t, t)))
  names = [f"perm{k}" for k in range(t)]
  d = {"config": {}, "stages": names, "metrics": {"acc": matrix.tolist()},
       "summary": {"acc": {"acc": 90.0, "bwt": -1.0, "forgetting": 2.0}},
       "criterion": {n: {"baseline": matrix[j, j], "final": matrix[-1, j], "drop": matrix[j, j] - matrix[-1, j],
                         "passed": True} for j, n in enumerate(names)},
       "params": 1000, "timing": {}}
  text = report.render_summary(d)
  assert _row(text, "Stage")[:2] == ["perm0 (%)", "perm1 (%)"]  # one metric for all: columns named by task
  assert _row(text, "Stage 17: perm16")[16] == f"{matrix[16, 16]:.1f}"
  assert _row(text, "Stage 2: perm1")[2] == "—"  # perm2 not learned yet
  assert _row(text, "Accuracy (%)") == ["90.0", "−1.0", "n/a", "2.0"]


def _png_size(path):
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_plots_write_pngs(tmp_path):
  rng = np.random.default_rng(1)
  steps = np.arange(0, 200, 5)
  curves = {s: (steps + 200 * k, np.exp(-steps / 50) * (k + 1) + 0.05 * rng.random(steps.size))
            for k, s in enumerate(["seg", "det", "cls"])}
  d = _results()
  paths = plots.write_plots(str(tmp_path), d, curves)
  # Each metric belongs to one task here: one headline matrix, no sparse per-metric ones.
  assert [os.path.basename(p) for p in paths] == ["matrix_headline.png", "evolution.png", "loss_curves.png"]
  for p in paths:
    w, h = _png_size(p)
    assert w > 300 and h > 200
  many = np.tril(rng.uniform(0, 100, (17, 17)))
  names = [f"task {k}" for k in range(17)]
  w, _ = _png_size(plots.plot_matrix(str(tmp_path / "m17.png"), many, names, names, "17 tasks"))
  assert w > 1000  # the figure grows with the number of tasks
  _png_size(plots.plot_evolution(str(tmp_path / "e17.png"), {"acc": many}, names))
  with pytest.raises(ValueError, match="row and"):
    plots.plot_matrix(str(tmp_path / "x.png"), many, names[:3], names, "bad")
  with pytest.raises(ValueError, match="steps but"):
    plots.plot_loss_curves(str(tmp_path / "x.png"), {"a": ([1, 2], [1.0])})
