"""Evaluation of tasks on their validation splits, with explicit arguments (no run object).

Scores are percentages (see clflax.tasks for each kind's metrics). With several devices each batch is split across
them; the per-batch summaries come back to the host and are accumulated there. Where the data lives on the device
(the classic benchmarks), `device_evaluation` evaluates all tasks in one compiled call instead.
"""
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
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


class DeviceEvaluation(NamedTuple):
  """All tasks' evaluation in one compiled call (steps.jit_device_evaluation) on device-side test sets."""
  evaluate: Callable  # (task_names, variables) -> {task: scores}.
  inference_times: Callable  # variables -> {task: median ms per image}.


def device_evaluation(program, source, task_ids: dict, hooks: Sequence = ()) -> DeviceEvaluation:
  """The evaluation through `program` on `source` for the tasks of `task_ids` (task -> id); `hooks` are called
  with 'eval' once per task, as `evaluate_task` does."""
  def evaluate(task_names: Sequence[str], variables: dict) -> dict[str, dict[str, float]]:
    for hook in tuple(hooks) * len(task_names):
      hook('eval')
    sums = jax.device_get(program(variables, source, jnp.asarray([task_ids[t] for t in task_names], jnp.int32)))
    return {t: tasks.scores(t, tasks.accumulate(t, tasks.new_accumulator(t), {k: v[i] for k, v in sums.items()},
                                                None)) for i, t in enumerate(task_names)}

  def inference_times(variables: dict) -> dict[str, float]:
    """Median milliseconds per image of the all-task call (after warm-up), the same for every task: they share one
    model and one input shape. Images are counted by the summaries' `count` (real rows only)."""
    ids = jnp.asarray(list(task_ids.values()), jnp.int32)
    images = int(np.sum(jax.device_get(program(variables, source, ids))['count']))
    samples = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(program(variables, source, ids))
      samples.append(time.perf_counter() - start)
    per_image = 1000 * float(np.median(samples)) / max(images, 1)
    return {t: per_image for t in task_ids}

  return DeviceEvaluation(evaluate, inference_times)
