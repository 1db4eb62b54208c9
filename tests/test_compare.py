"""clflax.reporting.compare on synthetic workdirs whose statistics are worked out by hand below."""
import json
import math
import os
import struct

import pytest

from clflax.reporting import compare

STAGES = ["seg", "det", "cls"]
BASELINE = {"seg": {"miou": 5.0}, "det": {"map": 2.0}, "cls": {"top1": 10.0}}


def _matrix_results(matrix, strategy, seed, extra_config=None, passed=True):
  """A results.json dict whose headline matrix is `matrix` (one metric per task, NaN elsewhere)."""
  names = ["miou", "map", "top1"]
  metrics = {m: [[row[j] if k == j else None for k in range(3)] for row in matrix] for j, m in enumerate(names)}
  return {
      "config": {"strategy.names": strategy, "seed": seed, "train.lr": 0.1, **(extra_config or {})},
      "stages": STAGES, "stage_titles": ["VOC segmentation", "COCO detection", "Imagenette classification"],
      "headline_metrics": dict(zip(STAGES, names)), "metrics": metrics, "headline": matrix,
      "baseline": BASELINE, "summary": {"headline": {"acc": 0.0, "bwt": 0.0, "forgetting": 0.0}},
      "criterion": {t: {"baseline": 0.0, "final": 0.0, "drop": 0.0, "passed": passed} for t in STAGES},
      "params": 10, "timing": {}}


# agem, seeds 0 and 1 (seed 1 = seed 0 + 4 on every learned cell):
#   seed 0: final [30, 20, 60]; ACC 110/3; BWT mean(30-50, 20-30) = -15; forgetting mean(50-30, 30-20) = 15
#   FWT = mean(R[0,1] - b_det, R[1,2] - b_cls) = mean(0 - 2, 0 - 10) = -6 for both seeds.
AGEM = [[[50, 0, 0], [40, 30, 0], [30, 20, 60]],
        [[54, 0, 0], [44, 34, 0], [34, 24, 64]]]
# ewc, seeds 0, 1, 2: R = [[60, 0, 0], [55, 40, 0], [a, 35, b]], a = 50, 53, 59 and b = 70, 70, 61.
EWC_A, EWC_B = [50, 53, 59], [70, 70, 61]


def _write(path, results):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for seed, m in enumerate(AGEM):
    _write(root / f"agem_{seed}", _matrix_results(m, ["agem"], seed))
  for seed, (a, b) in enumerate(zip(EWC_A, EWC_B)):
    m = [[60, 0, 0], [55, 40, 0], [a, 35, b]]
    _write(root / f"ewc_{seed}", _matrix_results(m, ["ewc"], seed, {"strategy.ewc.strength": 10 if seed == 2 else 100},
                                                 passed=seed != 1))
  corrupt = root / "broken"
  corrupt.mkdir()
  (corrupt / "results.json").write_text('{"config": {"seed": 0}, "stages": [')
  invalid = root / "invalid"
  _write(invalid, {"config": {}, "stages": STAGES})
  pending = root / "pending"  # a run in progress: config and a checkpoint's JSON meta, no results yet
  (pending / "checkpoints" / "progress" / "7" / "meta").mkdir(parents=True)
  (pending / "config.json").write_text(json.dumps({"tasks": STAGES, "seed": 3}))
  (pending / "checkpoints" / "progress" / "7" / "meta" / "metadata").write_text(
      json.dumps({"saves": 7, "stage": 1, "rows": [{"seg": {"miou": 1.0}}]}))
  return root


def _group(data, name):
  (bench,) = data["benchmarks"]
  return next(g for g in bench["groups"] if g["name"] == name)


def test_statistics_match_hand_computation(runs, tmp_path):
  text, data = compare.compare([str(runs / "agem_*"), str(runs / "ewc_*")], str(tmp_path / "out"), plot=False)
  agem, ewc = _group(data, "agem"), _group(data, "ewc")
  assert agem["n"] == 2 and agem["seeds"] == [0, 1] and ewc["seeds"] == [0, 1, 2]
  # agem: final seg 30, 34 -> mean 32, sample std sqrt((4 + 4) / 1) = sqrt(8).
  assert agem["final"]["seg"]["mean"] == pytest.approx(32.0)
  assert agem["final"]["seg"]["std"] == pytest.approx(math.sqrt(8))
  assert agem["acc"]["mean"] == pytest.approx((110 / 3 + 122 / 3) / 2)
  assert agem["bwt"]["mean"] == pytest.approx(-15.0) and agem["bwt"]["std"] == pytest.approx(0.0)
  assert agem["forgetting"]["mean"] == pytest.approx(15.0)
  assert agem["fwt"]["mean"] == pytest.approx(-6.0)
  # ewc: a = 50, 53, 59 -> mean 54, deviations -4, -1, 5 -> var 42 / 2 = 21.
  assert ewc["final"]["seg"]["mean"] == pytest.approx(54.0)
  assert ewc["final"]["seg"]["std"] == pytest.approx(math.sqrt(21))
  # b = 70, 70, 61 -> mean 67, deviations 3, 3, -6 -> var 54 / 2 = 27.
  assert ewc["final"]["cls"]["std"] == pytest.approx(math.sqrt(27))
  # ACC = (a + 35 + b) / 3 = 155/3, 158/3, 155/3 -> mean 52, var ((1 + 4 + 1) / 9) / 2 = 1/3.
  assert ewc["acc"]["mean"] == pytest.approx(52.0) and ewc["acc"]["std"] == pytest.approx(math.sqrt(1 / 3))
  # BWT = (a - 60 + 35 - 40) / 2 = -7.5, -6, -3 -> mean -5.5, var (4 + 0.25 + 6.25) / 2 = 5.25.
  assert ewc["bwt"]["mean"] == pytest.approx(-5.5) and ewc["bwt"]["std"] == pytest.approx(math.sqrt(5.25))
  # forgetting = (60 - a + 40 - 35) / 2 = 7.5, 6, 3 -> mean 5.5, same spread.
  assert ewc["forgetting"]["mean"] == pytest.approx(5.5)
  assert ewc["forgetting"]["std"] == pytest.approx(math.sqrt(5.25))
  assert ewc["passed"] == 2 and agem["passed"] == 2
  assert ewc["matrix_mean"][2][0] == pytest.approx(54.0) and ewc["matrix_std"][0][0] == pytest.approx(0.0)
  assert ewc["differ_in"] == ["strategy.ewc.strength"] and agem["differ_in"] == []
  # The markdown table: one row per group, best mean per column in bold.
  row = next(line for line in text.splitlines() if line.startswith("| ewc |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:4] == ["ewc", "3", "0, 1, 2", "**54.0 ± 4.6**"]  # sqrt(21) = 4.58
  assert cells[6:10] == ["**52.0 ± 0.6**", "**−5.5 ± 2.3**", "**5.5 ± 2.3**", "−6.0 ± 0.0"]  # FWT: a tie
  assert cells[-1] == "2/3"
  assert "differ in strategy.ewc.strength" in text
  with open(tmp_path / "out" / "compare.json") as f:
    assert json.load(f)["benchmarks"][0]["groups"][1]["final"]["seg"]["values"] == [50.0, 53.0, 59.0]


def test_group_by_splits_groups(runs, tmp_path):
  _, data = compare.compare([str(runs / "ewc_*")], str(tmp_path), ["strategy.ewc.strength"], plot=False)
  names = [g["name"] for g in data["benchmarks"][0]["groups"]]
  assert names == ["ewc, strategy.ewc.strength=10", "ewc, strategy.ewc.strength=100"]
  one = data["benchmarks"][0]["groups"][0]  # seed 2 alone: no spread
  assert one["final"]["seg"] == {"mean": 59.0, "std": None, "n": 1, "values": [59.0]}


def test_group_by_ignores_the_settings_of_strategies_a_run_does_not_use(tmp_path):
  # Every config carries every strategy's section: an A-GEM run's EWC strength is not one of its settings.
  m = [[50, 0, 0], [40, 30, 0], [30, 20, 60]]
  for seed, strength in enumerate([10, 100]):
    _write(tmp_path / f"agem_{seed}", _matrix_results(m, ["agem"], seed, {"strategy.ewc.strength": strength}))
    _write(tmp_path / f"both_{seed}", _matrix_results(m, ["ewc", "agem"], seed, {"strategy.ewc.strength": strength}))
  _, data = compare.compare([str(tmp_path / "*_*")], str(tmp_path / "out"), ["strategy.ewc.strength"], plot=False)
  groups = {g["name"]: g for g in data["benchmarks"][0]["groups"]}
  assert sorted(groups) == ["agem", "ewc+agem, strategy.ewc.strength=10", "ewc+agem, strategy.ewc.strength=100"]
  assert groups["agem"]["n"] == 2 and groups["agem"]["differ_in"] == []


def test_missing_corrupt_and_in_progress_runs_are_notes(runs, tmp_path, capsys):
  out = tmp_path / "cmp"
  code = compare.main([str(runs), str(runs / "nothing_*"), "--out", str(out)])
  printed = capsys.readouterr().out
  assert code == 0
  notes = "\n".join(json.load(open(out / "compare.json"))["notes"])
  assert "broken/results.json`: corrupt JSON (line 1" in notes
  assert "invalid/results.json`: results lack the key 'metrics'" in notes
  assert "pending`: no results.json yet" in notes and "1/3 stages finished" in notes
  assert "nothing_*` matches nothing" in notes
  assert "# Comparison of 5 runs" in printed and "corrupt JSON" in printed
  for name in ("compare.md", "final_scores.png", "summary.png", "matrices.png", "evolution.png"):
    data = (out / name).read_bytes()
    assert data, name
    if name.endswith(".png"):
      assert data[:8] == b"\x89PNG\r\n\x1a\n"
      width, height = struct.unpack(">II", data[16:24])
      assert width > 400 and height > 300


def test_nothing_to_compare_exits_nonzero(runs, tmp_path, capsys):
  assert compare.main([str(runs / "pending"), "--out", str(tmp_path / "x")]) == 1
  assert "No finished run" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_results_file_paths_and_duplicates(runs, tmp_path):
  paths = [str(runs / "agem_0" / "results.json"), str(runs / "agem_0"), str(runs / "agem_1")]
  _, data = compare.compare(paths, str(tmp_path), plot=False)
  assert _group(data, "agem")["n"] == 2  # agem_0 named twice, counted once


def test_long_task_sequences_keep_per_task_scores_out_of_the_table(tmp_path):
  t = 8  # e.g. permuted MNIST: one metric, no forgetting criterion recorded
  for seed, offset in enumerate([0.0, 2.0]):
    matrix = [[80.0 + offset if j <= i else 0.0 for j in range(t)] for i in range(t)]
    _write(tmp_path / "runs" / f"naive_{seed}",
           {"config": {"strategy.names": ["naive"], "seed": seed}, "stages": [f"perm{k}" for k in range(t)],
            "metrics": {"acc": matrix}, "summary": {"acc": 0.0, "bwt": 0.0, "forgetting": 0.0},
            "criterion": {}, "params": 1, "timing": {}})
  text, data = compare.compare([str(tmp_path / "runs")], str(tmp_path / "out"), plot=False)
  row = next(line for line in text.splitlines() if line.startswith("| naive |"))
  assert [c.strip() for c in row.strip("|").split("|")] == ["naive", "2", "0, 1", "81.0 ± 1.4", "+0.0 ± 0.0",
                                                           "0.0 ± 0.0", "n/a"]  # ACC 80, 82: std sqrt(2)
  assert data["benchmarks"][0]["groups"][0]["final"]["perm7"]["values"] == [80.0, 82.0]
  assert "8 tasks: each task's final score is in compare.json" in text
