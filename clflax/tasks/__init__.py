"""What each head means: its loss, its distillation target (LwF), and how its validation scores are computed.

The trainer is task-agnostic; everything that differs between segmentation, detection and classification lives in
one module per task kind (seg.py, det.py, cls.py, digits.py for the classic protocols), each with the same
functions; the ones here pick the module of a task's kind. Device side (`loss`, `distill`, `eval_outputs`) is
jittable; host side (`new_accumulator`, `accumulate`, `scores`) turns the eval outputs of many batches into metrics
(percentages).
"""
import jax
import ml_collections

from clflax.tasks import cls
from clflax.tasks import det
from clflax.tasks import digits
from clflax.tasks import seg

KINDS = {'seg': seg, 'det': det, 'cls': cls, 'digits': digits}
VISION = ('seg', 'det', 'cls')


def kind(task: str) -> str:
  """The vision heads are tasks of their own kind; any other task name is a classic-benchmark digit task."""
  return task if task in VISION else 'digits'


def _module(task: str):
  return KINDS[kind(task)]


def headline(task: str) -> str:
  return _module(task).HEADLINE


def metric_names(task: str) -> tuple:
  return _module(task).METRICS


def title(task: str) -> str:
  return _module(task).TITLE or task


def loss(task: str, outputs, batch: dict, train_cfg: ml_collections.ConfigDict):
  """(scalar loss, dict of named parts) of `task`'s head on `batch`; padding rows (valid=False) do not count."""
  return _module(task).loss(outputs, batch, train_cfg)


def distill(task: str, outputs, teacher_outputs, temperature: float):
  """LwF: keep `task`'s head answering like the previous model did, on the current images."""
  return _module(task).distill(outputs, jax.lax.stop_gradient(teacher_outputs), temperature)


def eval_outputs(task: str, outputs, batch: dict, max_detections: int) -> dict:
  """Small per-batch summaries to bring to the host (e.g. a confusion matrix, not the full masks)."""
  return _module(task).eval_outputs(outputs, batch, max_detections)


def new_accumulator(task: str) -> dict:
  return _module(task).new_accumulator()


def accumulate(task: str, acc: dict, outputs: dict, batch: dict) -> dict:
  """Adds one batch's eval outputs (already on the host) to `acc`, dropping padding rows."""
  return _module(task).accumulate(acc, outputs, batch)


def scores(task: str, acc: dict) -> dict:
  """Metrics of `task` in percent (NaN where undefined, e.g. no ground-truth boxes at all)."""
  return _module(task).scores(acc)
