"""Between stages: the memories, the teacher and every strategy's own consolidation, knowing no strategy by name.

What the active strategies need (`registry.needs`: the union of their `Needs`) decides what is kept: episodic
memories of each finished task (with the model's outputs on them when a strategy asks), the model as a teacher.
Then each strategy's `end_stage` updates its own state inside the optax state (Fisher, importance, anchors) from a
sample of the finished task and per-example loss / output functions.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clflax import tasks
from clflax.strategies import base
from clflax.strategies import memory
from clflax.strategies import registry
from clflax.trainer import parallel
from clflax.trainer import steps
from clflax.trainer.state import Context
from clflax.trainer.state import TrainState


def memory_size(config: ml_collections.ConfigDict) -> int:
  """Examples kept per task: the largest memory an active strategy asks, or the balancing fine-tune's."""
  size = registry.needs(config.strategy).memory_per_task
  return size or (config.train.balance_memory_per_task if config.train.balance_finetune_steps else 0)


def examples_per_task(config: ml_collections.ConfigDict) -> int:
  """Examples of a finished task the trainer draws: for its memory and for the strategies' `end_stage`."""
  return max(memory_size(config), registry.needs(config.strategy).examples)


def with_valid(examples: dict) -> dict:
  """Memories are always-real examples: give them the `valid` flag that the losses expect."""
  n = len(next(iter(examples.values())))
  return dict(examples, valid=np.ones((n,), bool))


def empty_memory(example_batch: dict, capacity: int, outputs=None) -> memory.ReplayBuffer:
  """An empty fixed-capacity buffer shaped like one example of `example_batch`; `outputs` (the model's outputs on
  the batch, arrays or shapes) adds the stored outputs (`memory.OUTPUTS`) to each example."""
  one = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), with_valid(example_batch))
  if outputs is not None:
    one[memory.OUTPUTS] = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), outputs)
  return memory.init(capacity, one)


def _outputs_fn(model, task):
  return lambda variables, batch: steps.forward(model, variables['params'], variables['batch_stats'], batch, task,
                                                None, train=False)[0]


def initial_memories(config: ml_collections.ConfigDict, model, variables: dict, example_batches: dict,
                     shared: bool) -> dict:
  """The empty memories of a run: none unless a strategy (or the balancing fine-tune) keeps one; `shared` (classic
  protocols: one head, one example shape) one buffer of `memory_size` rows per task in stage order
  (`memory.SHARED`), else one per task."""
  size = memory_size(config)
  if not size:
    return {}
  store_outputs = registry.needs(config.strategy).memory_outputs

  def empty(task, capacity):
    batch = example_batches[task]
    outputs = None
    if store_outputs:  # Shapes only: no model call.
      outputs = jax.eval_shape(_outputs_fn(model, task), variables, jax.tree.map(jnp.asarray, batch))
    return empty_memory(batch, capacity, outputs)

  if shared:
    return {memory.SHARED: empty(config.tasks[0], size * len(config.tasks))}
  return {t: empty(t, size) for t in config.tasks}


def joint_memories(data, task_names) -> dict:
  """The joint upper bound's memories: each task's whole (un-augmented) training set in a buffer of its size."""
  memories = {}
  for task in task_names:
    examples = with_valid(data.memory_examples(task, None))
    buffer = empty_memory(examples, len(examples['valid']))
    memories[task] = memory.append(buffer, jax.tree.map(jnp.asarray, examples))
  return memories


def with_outputs(model, variables: dict, task: str, examples: dict, chunk: int = 32) -> dict:
  """examples plus `task`'s outputs on them under `variables` (DER's stored logits), `chunk` rows per call (the
  last chunk padded, so one compilation)."""
  n = len(examples['valid'])
  fn = jax.jit(_outputs_fn(model, task))
  padded = jax.tree.map(lambda x: x[np.arange(-(-n // chunk) * chunk) % n], examples)
  parts = [fn(variables, jax.tree.map(lambda x: x[i:i + chunk], padded)) for i in range(0, n, chunk)]
  outputs = jax.tree.map(lambda *o: jnp.concatenate(o)[:n], *parts)
  return dict(examples, **{memory.OUTPUTS: outputs})


def end_of_stage(model, variables: dict, task: str, stage: int, examples: dict,
                 train_cfg: ml_collections.ConfigDict) -> base.EndOfStage:
  """The finished task's sample and its per-example functions, batch norm in inference mode."""

  def example_outputs(params, example):
    batch = jax.tree.map(lambda x: x[None], example)
    return steps.forward(model, params, variables['batch_stats'], batch, task, None, train=False)[0]

  def example_loss(params, example):
    batch = jax.tree.map(lambda x: x[None], example)
    return tasks.loss(task, example_outputs(params, example), batch, train_cfg)[0]

  return base.EndOfStage(stage=stage, task=task, examples=jax.tree.map(jnp.asarray, examples),
                         example_loss=example_loss, example_outputs=example_outputs)


def consolidate(state: TrainState, context: Context, task: str, stage: int, examples: dict, *, model,
                config: ml_collections.ConfigDict) -> tuple[TrainState, Context]:
  """The state and context after learning `task` (stage `stage`); `examples` is a sample of its training set."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  examples = with_valid(examples)
  end = end_of_stage(model, variables, task, stage, examples, config.train)
  for strategy in registry.resolve(config.strategy.names):
    if strategy.end_stage is not None:
      state = strategy.end_stage(registry.section(config.strategy, strategy), state, end)
  wanted = registry.needs(config.strategy)
  memories = dict(context.memories)
  if memory.SHARED in memories:  # One memory for all tasks: this task's examples join the earlier ones.
    # Exactly memory_size rows (a short sample repeats), so that task k owns rows k*m..(k+1)*m (GEM's blocks).
    n = len(examples['valid'])
    kept = jax.tree.map(lambda x: x[np.arange(memory_size(config)) % n], examples)
    kept = with_outputs(model, variables, task, kept) if wanted.memory_outputs else kept
    memories[memory.SHARED] = memory.append(memories[memory.SHARED], kept)
  elif task in memories and not config.train.joint:  # Joint: the memories already hold every example.
    capacity = jax.tree.leaves(memories[task].data)[0].shape[0]
    kept = jax.tree.map(lambda x: x[:capacity], examples)
    kept = with_outputs(model, variables, task, kept) if wanted.memory_outputs else kept
    memories[task] = memory.append(memories[task], kept)
  teacher = parallel.copy_tree(variables) if wanted.teacher else context.teacher
  return state, Context(memories=memories, teacher=teacher)
