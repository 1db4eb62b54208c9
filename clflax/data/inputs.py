"""What the trainer reads: per task, batches indexed by step, padded eval batches, and memory examples.

`pipeline.trainer_data(config)` builds it from the datasets, `classic.load_data(config)` for the MNIST protocols;
tests build it from arrays with `from_arrays`.
Batches are per-process numpy dicts (see clflax.data.pipeline for the keys of each task).
"""
from typing import Any, Callable, NamedTuple

import numpy as np

NUM_CLS_CLASSES = 10  # Imagenette.


class Data(NamedTuple):
  description: str  # Which data the run uses, and how to point it elsewhere.
  train_sets: dict  # task -> object with `[step]` giving that step's training batch (any epoch).
  steps_per_epoch: dict  # task -> int.
  eval_batches: dict  # task -> list of padded batches (`valid` marks real rows).
  example_batches: dict  # task -> one batch (shapes for memories).
  # (task, count) -> `count` un-augmented training examples of the task (memories, Fisher), or with count=None its
  # whole training set (the joint upper bound).
  memory_examples: Callable[..., dict]
  # Optional on-device epochs (classic benchmarks): (source pytree, batch_fn(source, task_id, epoch, step) -> batch,
  # task -> task_id). When set, each epoch runs as one compiled lax.scan instead of a Python loop over steps.
  scan: Any = None
  # Optional on-device evaluation (classic benchmarks): (source pytree, batch_fn(source, task_id, batch_index) ->
  # padded batch, batches per task, task -> task_id). When set, all tasks are evaluated in one compiled call.
  device_eval: Any = None
  # task -> the dataset's own class identifiers in label order (Imagenette: WordNet ids), where the source has them.
  class_ids: Any = None


class _ArrayEpochs:
  """Step-indexed batches over in-memory arrays, reshuffled every epoch from (seed, epoch)."""

  def __init__(self, arrays: dict, batch_size: int, seed: int):
    self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
    self.size = len(next(iter(arrays.values())))
    self.steps_per_epoch = self.size // batch_size

  def __getitem__(self, step: int) -> dict:
    epoch, index = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
    rows = order[index * self.batch_size:(index + 1) * self.batch_size]
    return dict({k: v[rows] for k, v in self.arrays.items()}, valid=np.ones(len(rows), bool))


def pad_batches(arrays: dict, batch_size: int) -> list[dict]:
  """Fixed-shape eval batches covering every example once; padding rows have valid=False."""
  n = len(next(iter(arrays.values())))
  batches = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    batches.append(dict({k: v[rows] for k, v in arrays.items()}, valid=valid))
  return batches


def from_arrays(train: dict, val: dict, *, batch_size: int, eval_batch_size: int, seed: int = 0,
                steps_per_epoch: int = 0, description: str = 'in-memory arrays') -> Data:
  """Data from {task: {key: array}} dicts (tests, and the classic benchmarks)."""
  train_sets = {t: _ArrayEpochs(a, batch_size, seed) for t, a in train.items()}
  steps = {t: min(s.steps_per_epoch, steps_per_epoch) if steps_per_epoch else s.steps_per_epoch
           for t, s in train_sets.items()}
  return Data(
      description=description, train_sets=train_sets, steps_per_epoch=steps,
      eval_batches={t: pad_batches(a, eval_batch_size) for t, a in val.items()},
      example_batches={t: s[0] for t, s in train_sets.items()},
      memory_examples=lambda task, count=None: {k: v[:count] for k, v in train[task].items()})
