"""Evaluation of tasks on their validation splits, with explicit arguments (no run object).

Scores are percentages (see clflax.tasks for each kind's metrics). With several devices each batch is split across
them; the per-batch summaries come back to the host and are accumulated there.
"""
import time
from typing import Callable, Sequence

import jax
import numpy as np

from clflax import tasks


def evaluate_task(task: str, eval_step, batches, variables: dict, shard: Callable, hooks: Sequence = ()) -> dict:
  """Scores of `task` on its validation `batches` under `variables` (percent); `hooks` are called with 'eval'."""
  for hook in hooks:
    hook('eval')
  acc = tasks.new_accumulator(task)
  for batch in batches:
    outputs = jax.device_get(eval_step(variables, shard(batch)))
    acc = tasks.accumulate(task, acc, outputs, batch)
  return tasks.scores(task, acc)


def evaluate_all(task_names: Sequence[str], eval_steps: dict, eval_batches: dict, variables, shard: Callable,
                 hooks: Sequence = ()) -> dict[str, dict[str, float]]:
  """Every task's scores; `variables` is one dict, or task -> dict (task-specific weights, e.g. PackNet's)."""
  pick = variables if callable(variables) else (lambda _: variables)
  return {t: evaluate_task(t, eval_steps[t], eval_batches[t], pick(t), shard, hooks) for t in task_names}


def inference_times(task_names: Sequence[str], eval_steps: dict, eval_batches: dict, variables: dict,
                    shard: Callable) -> dict[str, float]:
  """Median milliseconds per image of each head's jitted eval step (after warm-up)."""
  times = {}
  for task in task_names:
    batch = shard(eval_batches[task][0])
    jax.block_until_ready(eval_steps[task](variables, batch))
    samples = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(eval_steps[task](variables, batch))
      samples.append(time.perf_counter() - start)
    times[task] = 1000 * float(np.median(samples)) / len(eval_batches[task][0]['valid'])
  return times
