"""clflax.tracking against a local MLflow file store, read back with MLflow's client API."""
import json
import os
import sys

import ml_collections
import numpy as np
import pytest
from clu.metric_writers import interface

from clflax.reporting import tracking


class _Recorder(interface.MetricWriter):
  """A base writer that remembers what reached it."""

  def __init__(self):
    self.calls = []

  def write_summaries(self, step, values, metadata=None):
    self.calls.append(("summaries", step, dict(values)))

  def write_scalars(self, step, scalars):
    self.calls.append(("scalars", step, dict(scalars)))

  def write_images(self, step, images):
    self.calls.append(("images", step, sorted(images)))

  def write_videos(self, step, videos):
    self.calls.append(("videos", step, sorted(videos)))

  def write_audios(self, step, audios, *, sample_rate):
    self.calls.append(("audios", step, sorted(audios)))

  def write_texts(self, step, texts):
    self.calls.append(("texts", step, dict(texts)))

  def write_histograms(self, step, arrays, num_buckets=None):
    self.calls.append(("histograms", step, sorted(arrays)))

  def write_hparams(self, hparams):
    self.calls.append(("hparams", dict(hparams)))

  def flush(self):
    self.calls.append(("flush",))

  def close(self):
    self.calls.append(("close",))


def _config(enabled=True, uri=""):
  return ml_collections.ConfigDict({
      "seed": 3, "strategy": {"names": ("ewc", "agem"), "ewc": {"strength": 100.0}},
      "tracking": {"mlflow": enabled, "mlflow_uri": uri, "experiment": "clflax-test"}})


def _mlflow():
  return pytest.importorskip("mlflow", reason="MLflow is optional: pip install " + tracking.MLFLOW_PIN)


def _read_client(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
  return MlflowClient(tracking_uri="file:" + os.path.join(str(workdir), "mlruns"))


def test_disabled_returns_the_base_writer(tmp_path):
  base = _Recorder()
  assert tracking.make_writer(_config(enabled=False), str(tmp_path), base) is base
  assert tracking.make_writer(ml_collections.ConfigDict({"seed": 0}), str(tmp_path), base) is base  # no field
  assert not (tmp_path / tracking.RUN_FILE).exists() and not (tmp_path / "mlruns").exists()


def test_missing_mlflow_names_the_install_command(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
  with pytest.raises(ImportError, match=r"pip install mlflow-skinny==\d+\.\d+\.\d+$"):
    tracking.make_writer(_config(), str(tmp_path), _Recorder())


def test_metric_key():
  assert tracking.metric_key("val/seg_miou") == "val/seg_miou"
  assert tracking.metric_key("a:b@c d") == "a_b_c d"
  assert tracking.metric_key("/a//b/../c/.") == "a/b/c"
  assert len(tracking.metric_key("k" * 400)) == 250


def test_writer_logs_params_scalars_images_texts_histograms(tmp_path):
  _mlflow()
  base = _Recorder()
  writer = tracking.make_writer(_config(), str(tmp_path), base)
  writer.write_scalars(10, {"train/loss": np.float32(2.5), "val/seg_miou": 31.25})
  writer.write_scalars(20, {"train/loss": 1.5})
  image = np.linspace(0, 1, 2 * 4 * 5 * 3).reshape(2, 4, 5, 3)
  writer.write_images(20, {"pred": image})
  writer.write_texts(20, {"note": "stage 1 done"})
  writer.write_histograms(20, {"w": np.array([0, 0, 1, 1, 1, 2.0])}, {"w": 2})
  writer.flush()
  writer.close()
  assert [c[0] for c in base.calls] == ["scalars", "scalars", "images", "texts", "histograms", "flush", "close"]

  record = json.loads((tmp_path / tracking.RUN_FILE).read_text())
  c = _read_client(tmp_path)
  run = c.get_run(record["run_id"])
  assert run.info.status == "FINISHED"
  assert c.get_experiment(run.info.experiment_id).name == "clflax-test"
  assert run.data.params["seed"] == "3"
  assert json.loads(run.data.params["strategy.names"]) == ["ewc", "agem"]
  assert run.data.params["strategy.ewc.strength"] == "100.0"
  history = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "train/loss"))
  assert history == [(10, 2.5), (20, 1.5)]
  assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val/seg_miou")] == [(10, 31.25)]

  from PIL import Image  # pylint: disable=g-import-not-at-top
  local = c.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
  for i in range(2):
    pixels = np.asarray(Image.open(os.path.join(local, "images", "pred", f"step_20_{i}.png")))
    np.testing.assert_array_equal(pixels, np.round(image[i] * 255).astype(np.uint8))
  with open(os.path.join(local, "texts", "note", "step_20.txt")) as f:
    assert f.read() == "stage 1 done"
  with open(os.path.join(local, "histograms", "w", "step_20.json")) as f:
    hist = json.load(f)
  assert hist["edges"] == [0.0, 1.0, 2.0] and hist["counts"] == [2, 4]  # the last bucket holds its right edge


def _results():
  # seg -> det after 2 stages; headline matrix [[40, 0], [30, 50]]; NaN (None) where a task lacks the metric.
  return {"config": {"seed": 3}, "stages": ["seg", "det"],
          "metrics": {"miou": [[40.0, None], [30.0, None]], "map": [[None, 0.0], [None, 50.0]]},
          "baseline": {"seg": {"miou": 1.0}, "det": {"map": 2.0}},
          "summary": {"headline": {"acc": 40.0, "bwt": -10.0, "forgetting": 10.0, "fwt": -2.0}},
          "criterion": {}, "params": 5, "timing": {}}


def test_resume_and_run_artifacts(tmp_path):
  _mlflow()
  writer = tracking.make_writer(_config(), str(tmp_path), _Recorder())
  writer.write_scalars(1, {"train/loss": 3.0})
  writer.close()
  first = json.loads((tmp_path / tracking.RUN_FILE).read_text())["run_id"]
  # A resumed workdir logs into the same run (running again).
  writer = tracking.make_writer(_config(), str(tmp_path), _Recorder())
  writer.write_scalars(2, {"train/loss": 2.0})
  assert json.loads((tmp_path / tracking.RUN_FILE).read_text())["run_id"] == first
  c = _read_client(tmp_path)
  assert c.get_run(first).info.status == "RUNNING"
  assert len(c.search_runs([c.get_run(first).info.experiment_id])) == 1

  (tmp_path / "results.json").write_text(json.dumps(_results()))
  (tmp_path / "summary.md").write_text("# Continual-learning results\n")
  (tmp_path / "plots").mkdir()
  (tmp_path / "plots" / "evolution.png").write_bytes(b"\x89PNG\r\n\x1a\n")
  assert tracking.log_run_artifacts(str(tmp_path)) == first
  writer.close()
  names = {a.path for a in c.list_artifacts(first)} | {a.path for a in c.list_artifacts(first, "plots")}
  assert {"results.json", "summary.md", "plots/evolution.png"} <= names
  steps = lambda key: sorted((m.step, m.value) for m in c.get_metric_history(first, key))  # noqa: E731
  assert steps("train/loss") == [(1, 3.0), (2, 2.0)]
  assert steps("stage/miou/seg") == [(0, 1.0), (1, 40.0), (2, 30.0)]  # baseline, then after each stage
  assert steps("stage/map/det") == [(0, 2.0), (1, 0.0), (2, 50.0)]
  assert steps("summary/headline/bwt") == [(2, -10.0)]
  assert "stage/miou/det" not in c.get_run(first).data.metrics  # NaN cells are left out
  assert tracking.log_run_artifacts(str(tmp_path / "elsewhere")) is None  # no MLflow run there


def test_corrupt_run_record_is_a_clear_error(tmp_path):
  (tmp_path / tracking.RUN_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="mlflow_run.json is not a readable MLflow run record"):
    tracking.log_run_artifacts(str(tmp_path))
