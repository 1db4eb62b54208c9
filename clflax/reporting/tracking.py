"""Optional MLflow tracking beside clu's writers: params, per-step scalars, per-stage metrics and the run's reports.

MLflow is an optional dependency (`pip install mlflow-skinny==3.17.2`); nothing here imports it unless
`config.tracking.mlflow` is on. `make_writer` adds an `MlflowWriter` (a clu `MetricWriter`) to the trainer's writer
and records the MLflow run in `workdir/mlflow_run.json`, so a resumed workdir keeps logging into the same run and
`log_run_artifacts(workdir)` can find it after the reports are written.

The default store is `file:<workdir>/mlruns` (browse it with `mlflow ui --backend-store-uri <workdir>/mlruns`).
MLflow >= 3.8 keeps its file store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE=true`: for a file store
URI that variable is set (when unset) before the store opens. Any other URI (sqlite:///…, http://…) is used as is.
"""
import glob
import io
import json
import os
import re
import time
import urllib.parse
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np
from clu.metric_writers import interface
from clu.metric_writers import multi_writer

from clflax.runtime import files

MLFLOW_PIN = "mlflow-skinny==3.17.2"
RUN_FILE = "mlflow_run.json"
_MAX_KEY = 250  # MLflow's limit on metric and param names
_MAX_PARAM_VALUE = 6000  # and on param values (longer ones are truncated)
_BATCH = 100  # params per log_batch call (MLflow's limit); metrics allow 1000


def import_mlflow():
  """The mlflow module, or an ImportError whose one line says how to install it."""
  try:
    import mlflow  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"config.tracking.mlflow is on but MLflow is not installed: pip install {MLFLOW_PIN}") from None
  return mlflow


def default_uri(workdir: str) -> str:
  return "file:" + os.path.join(os.path.abspath(workdir), "mlruns")


def _is_file_store(uri: str) -> bool:
  return urllib.parse.urlparse(uri).scheme in ("", "file")


def client(uri: str):
  """An `MlflowClient` on `uri` (no global tracking URI is set)."""
  mlflow = import_mlflow()
  if _is_file_store(uri):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
  return mlflow.tracking.MlflowClient(tracking_uri=uri)


def metric_key(name: str) -> str:
  """`name` as a valid MLflow key: characters other than letters, digits, _ - . space / become '_'; empty, '.'
  and '..' path segments are dropped (MLflow rejects keys that normalise to another path)."""
  key = re.sub(r"[^/\w.\- ]", "_", str(name))
  key = "/".join(part for part in key.split("/") if part not in ("", ".", ".."))
  return (key or "_")[:_MAX_KEY]


def _param_value(value: Any) -> str:
  text = value if isinstance(value, str) else json.dumps(value, default=str)
  return text[:_MAX_PARAM_VALUE]


def _chunks(items: Sequence[Any], size: int):
  return [items[i:i + size] for i in range(0, len(items), size)]


def _now_ms() -> int:
  return int(time.time() * 1000)


class MlflowWriter(interface.MetricWriter):
  """A clu MetricWriter logging into one MLflow run through an `MlflowClient` (synchronous, no global state).

  Scalars become metrics at their step; images PNG artifacts `images/<key>/step_<step>_<i>.png`; texts
  `texts/<key>/step_<step>.txt`; histograms JSON artifacts `histograms/<key>/step_<step>.json` (bucket edges and
  counts; MLflow has no histogram type); hparams become params. Videos and audio are not supported (logged once
  per call as a warning) so that a MultiWriter can still hand them to the writers that do support them.
  """

  def __init__(self, mlflow_client, run_id: str):
    self._client = mlflow_client
    self._run_id = run_id
    self._closed = False

  @property
  def run_id(self) -> str:
    return self._run_id

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
    now = _now_ms()
    metrics = [Metric(metric_key(k), float(np.asarray(v)), now, int(step)) for k, v in scalars.items()]
    for chunk in _chunks(metrics, 1000):
      self._client.log_batch(self._run_id, metrics=chunk)

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None):
    """Single-number summaries are logged as scalars; larger tensors are skipped (no MLflow equivalent)."""
    del metadata
    scalars = {k: v for k, v in values.items() if np.size(v) == 1}
    if len(scalars) < len(values):
      logging.warning("MlflowWriter skips non-scalar summaries: %s", sorted(set(values) - set(scalars)))
    if scalars:
      self.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    for key, value in images.items():
      array = np.asarray(value)
      if array.ndim == 3:
        array = array[None]
      if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image '{key}' must be [N, H, W, C] or [H, W, C] with C in 1, 3, 4; got {array.shape}")
      if array.dtype != np.uint8:  # floats are taken to be in [0, 1], as clu's summary writer does
        array = np.clip(np.round(np.asarray(array, np.float64) * 255), 0, 255).astype(np.uint8)
      for i, image in enumerate(array):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        self._log_bytes(buffer.getvalue(), f"images/{metric_key(key)}/step_{int(step)}_{i}.png")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.warning("MlflowWriter does not log videos (%s at step %d)", sorted(videos), step)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    logging.warning("MlflowWriter does not log audio (%s at step %d)", sorted(audios), step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      self._client.log_text(self._run_id, str(text), f"texts/{metric_key(key)}/step_{int(step)}.txt")

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Optional[Mapping[str, int]] = None):
    for key, value in arrays.items():
      values = np.asarray(value, np.float64).reshape(-1)
      values = values[np.isfinite(values)]
      counts, edges = np.histogram(values, bins=(num_buckets or {}).get(key, 30))
      self._client.log_dict(self._run_id, {"edges": edges.tolist(), "counts": counts.tolist(), "step": int(step)},
                            f"histograms/{metric_key(key)}/step_{int(step)}.json")

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Params are immutable in MLflow: writing a key again with the same value is fine, another value raises."""
    from mlflow.entities import Param  # pylint: disable=g-import-not-at-top
    params = [Param(metric_key(k), _param_value(v)) for k, v in sorted(hparams.items())]
    for chunk in _chunks(params, _BATCH):
      self._client.log_batch(self._run_id, params=chunk)

  def flush(self):
    pass  # every call above has reached the store when it returns

  def close(self):
    """Marks the MLflow run FINISHED (once)."""
    if not self._closed:
      self._client.set_terminated(self._run_id, "FINISHED")
      self._closed = True

  def _log_bytes(self, data: bytes, artifact_file: str):
    import tempfile  # pylint: disable=g-import-not-at-top
    directory, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, name)
      with open(path, "wb") as f:
        f.write(data)
      self._client.log_artifact(self._run_id, path, directory)


# ------------------------------------------------------------------------------------------------ run setup


def _tracking_config(config) -> Mapping[str, Any]:
  tracking = config.get("tracking") if hasattr(config, "get") else None
  return tracking or {}


def _flatten(config) -> dict:
  from clflax.trainer import workdirs  # pylint: disable=g-import-not-at-top
  return workdirs.flatten(config)


def start_run(uri: str, experiment: str, workdir: str, params: Mapping[str, Any]) -> MlflowWriter:
  """An MlflowWriter on the run recorded in `workdir` (same URI and experiment, run still in the store), or on a
  new run named after the workdir; logs `params` and records the run in workdir/mlflow_run.json."""
  c = client(uri)
  found = c.get_experiment_by_name(experiment)
  experiment_id = found.experiment_id if found else c.create_experiment(experiment)
  record = read_run_record(workdir)
  run_id = None
  if record and record.get("tracking_uri") == uri and record.get("experiment_id") == experiment_id:
    try:
      run_id = c.get_run(record["run_id"]).info.run_id
      c.update_run(run_id, status="RUNNING")
    except Exception:  # pylint: disable=broad-except
      logging.warning("MLflow run %s recorded in %s is gone; starting a new run", record.get("run_id"), workdir)
      run_id = None
  if run_id is None:
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    run_id = c.create_run(experiment_id, run_name=name, tags={"workdir": os.path.abspath(workdir)}).info.run_id
  files.write_text_atomically(os.path.join(workdir, RUN_FILE),
                              json.dumps({"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id},
                                         indent=2))
  writer = MlflowWriter(c, run_id)
  writer.write_hparams(params)
  return writer


def read_run_record(workdir: str) -> Optional[dict]:
  """{'tracking_uri', 'experiment_id', 'run_id'} from workdir/mlflow_run.json, or None when there is none."""
  path = os.path.join(workdir, RUN_FILE)
  if not files.exists(path):
    return None
  try:
    record = json.loads(files.read_text(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable MLflow run record ({e}); delete it to start a new run") from None
  if not isinstance(record, dict) or not all(k in record for k in ("tracking_uri", "experiment_id", "run_id")):
    raise ValueError(f"{path} lacks tracking_uri / experiment_id / run_id; delete it to start a new run")
  return record


def make_writer(config, workdir: str, base_writer: interface.MetricWriter) -> interface.MetricWriter:
  """`base_writer` alone when `config.tracking.mlflow` is off (or on processes other than 0), else a clu
  MultiWriter of it and an MlflowWriter (the config is logged as the run's params)."""
  tracking = _tracking_config(config)
  if not tracking.get("mlflow", False):
    return base_writer
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return base_writer
  uri = tracking.get("mlflow_uri") or default_uri(workdir)
  experiment = tracking.get("experiment") or "clflax"
  writer = start_run(uri, experiment, workdir, _flatten(config))
  return multi_writer.MultiWriter([base_writer, writer])


# ------------------------------------------------------------------------------------------------ reports


def stage_metrics(results: Mapping[str, Any]) -> list:
  """(step, {key: value}) pairs from a results dict: every metric of every task after each stage k at step k
  ('stage/<metric>/<task>'), the baseline at step 0, and the continual summaries ('summary/<metric>/<acc|bwt|…>')
  at the last stage. NaN entries (a task without that metric) are left out."""
  stages = list(results["stages"])
  rows = [{} for _ in range(len(stages) + 1)]
  for metric, matrix in results["metrics"].items():
    m = np.asarray(matrix, np.float64)
    for i in range(m.shape[0]):
      for j, task in enumerate(stages):
        if np.isfinite(m[i, j]):
          rows[i + 1][f"stage/{metric}/{task}"] = float(m[i, j])
  for task, scores in (results.get("baseline") or {}).items():
    if isinstance(scores, Mapping):
      rows[0].update({f"stage/{m}/{task}": float(v) for m, v in scores.items() if v is not None})
  summary = results.get("summary") or {}
  if any(isinstance(v, (int, float)) for v in summary.values()):
    summary = {"headline": summary}
  for metric, values in summary.items():
    rows[-1].update({f"summary/{metric}/{k}": float(v) for k, v in values.items()
                     if isinstance(v, (int, float)) and np.isfinite(v)})
  return [(step, row) for step, row in enumerate(rows) if row]


def log_run_artifacts(workdir: str) -> Optional[str]:
  """Logs results.json's per-stage and summary metrics, and results.json, summary.md and plots/*.png as
  artifacts, into the MLflow run recorded in `workdir`; returns its run id, or None when the workdir has no MLflow
  run (tracking off). Files that are absent are skipped."""
  record = read_run_record(workdir)
  if record is None:
    return None
  c = client(record["tracking_uri"])
  writer = MlflowWriter(c, record["run_id"])
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
    for step, scalars in stage_metrics(results):
      writer.write_scalars(step, scalars)
  for name in ("results.json", "summary.md", "config.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      c.log_artifact(record["run_id"], path)
  for path in sorted(glob.glob(os.path.join(workdir, "plots", "*.png"))):
    c.log_artifact(record["run_id"], path, "plots")
  return record["run_id"]
