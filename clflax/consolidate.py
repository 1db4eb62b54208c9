"""Between stages: each configured strategy keeps what it needs of the task just learned.

EWC: the exact per-example Fisher diagonal on a sample of the task; MAS: its output-sensitivity importance; SI and
L2: re-anchoring (SI turns its path integral into importance); A-GEM / GEM / replay / the balancing fine-tune: an
episodic memory of the task; DER: the same memory plus the model's outputs on it at the end of the stage; LwF: the
current model as the teacher of later stages. Each update is a pure function applied to
the strategy's own NamedTuple inside the optax state (`registry.replace_state`).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clflax import parallel
from clflax import steps
from clflax import tasks
from clflax.strategies import der
from clflax.strategies import ewc
from clflax.strategies import l2
from clflax.strategies import mas
from clflax.strategies import registry
from clflax.strategies import replay
from clflax.strategies import si


def needs_memory(config: ml_collections.ConfigDict) -> bool:
  names = set(config.strategy.names)
  return bool(names & set(registry.MEMORY_STRATEGIES)) or config.train.balance_finetune_steps > 0


def memory_size(config: ml_collections.ConfigDict) -> int:
  """Examples kept per task: the larger of the memory-based strategies' settings."""
  names = config.strategy.names
  sizes = [config.strategy[name].memory_per_task for name in registry.MEMORY_STRATEGIES if name in names]
  return max(sizes) if sizes else config.strategy.replay.memory_per_task


def with_valid(examples: dict) -> dict:
  """Memories are always-real examples: give them the `valid` flag that the losses expect."""
  n = len(next(iter(examples.values())))
  return dict(examples, valid=np.ones((n,), bool))


def empty_memory(example_batch: dict, capacity: int, outputs=None) -> replay.ReplayBuffer:
  """An empty fixed-capacity buffer shaped like one example of `example_batch`; `outputs` (the model's outputs on
  the batch, arrays or shapes) adds DER's stored logits to each example."""
  one = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), with_valid(example_batch))
  if outputs is not None:
    one[der.LOGITS] = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), outputs)
  return replay.init(capacity, one)


def _outputs_fn(model, task):
  return lambda variables, batch: steps.forward(model, variables['params'], variables['batch_stats'], batch, task,
                                                None, train=False)[0]


def initial_memories(config: ml_collections.ConfigDict, model, variables: dict, example_batches: dict,
                     shared: bool) -> dict:
  """The empty memories of a run: none without a memory strategy; `shared` (classic benchmarks: one head, one
  example shape) one buffer of `memory_size` rows per task in stage order (`steps.SHARED`); else one per task."""
  if not needs_memory(config):
    return {}
  size = memory_size(config)

  def empty(task, capacity):
    batch = example_batches[task]
    outputs = None
    if 'der' in config.strategy.names:  # Shapes only: no model call.
      outputs = jax.eval_shape(_outputs_fn(model, task), variables, jax.tree.map(jnp.asarray, batch))
    return empty_memory(batch, capacity, outputs)

  if shared:
    return {steps.SHARED: empty(config.tasks[0], size * len(config.tasks))}
  return {t: empty(t, size) for t in config.tasks}


def joint_memories(data, task_names) -> dict:
  """The joint upper bound's memories: each task's whole (un-augmented) training set in a buffer of its size."""
  memories = {}
  for task in task_names:
    examples = with_valid(data.memory_examples(task, everything=True))
    buffer = empty_memory(examples, len(examples['valid']))
    memories[task] = replay.append(buffer, jax.tree.map(jnp.asarray, examples))
  return memories


def with_outputs(model, variables: dict, task: str, examples: dict, chunk: int = 32) -> dict:
  """examples plus `task`'s outputs on them under `variables` (DER's stored logits), `chunk` rows per call (the
  last chunk padded, so one compilation)."""
  n = len(examples['valid'])
  fn = jax.jit(_outputs_fn(model, task))
  padded = jax.tree.map(lambda x: x[np.arange(-(-n // chunk) * chunk) % n], examples)
  parts = [fn(variables, jax.tree.map(lambda x: x[i:i + chunk], padded)) for i in range(0, n, chunk)]
  outputs = jax.tree.map(lambda *o: jnp.concatenate(o)[:n], *parts)
  return dict(examples, **{der.LOGITS: outputs})


def _example_loss(model, variables, task, train_cfg):
  """loss_fn(params, example) of ONE example through `task`'s head, batch norm in inference mode."""

  def loss_fn(params, example):
    batch = jax.tree.map(lambda x: x[None], example)
    outputs, _ = steps.forward(model, params, variables['batch_stats'], batch, task, None, train=False)
    return tasks.loss(task, outputs, batch, train_cfg)[0]

  return loss_fn


def _example_output(model, variables, task):
  def output_fn(params, example):
    batch = jax.tree.map(lambda x: x[None], example)
    return steps.forward(model, params, variables['batch_stats'], batch, task, None, train=False)[0]

  return output_fn


def consolidate(state: steps.TrainState, context: steps.Context, task: str, examples: dict, *, model,
                config: ml_collections.ConfigDict) -> tuple[steps.TrainState, steps.Context]:
  """Returns the state and context after learning `task`; `examples` is a sample of its training set (numpy)."""
  names = set(config.strategy.names)
  strategy = config.strategy
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  examples = with_valid(examples)
  opt_state = state.opt_state
  chunk = 4  # Per-example gradients of a few examples at a time: bounded memory for big backbones.
  if 'ewc' in names and strategy.ewc.fisher == 'running':  # Authors' estimator: replaced each task, in [0, 1].
    running = registry.find_state(opt_state, ewc.RunningFisherState)
    fisher = ewc.normalize_fisher(running.acc)
    opt_state = registry.replace_state(opt_state, ewc.RunningFisherState, ewc.reset_running)
    opt_state = registry.replace_state(
        opt_state, ewc.EwcState, lambda s: ewc.consolidate(s, state.params, fisher, strategy.ewc.decay))
  elif 'ewc' in names:
    sample = jax.tree.map(lambda x: x[:strategy.ewc.fisher_samples], examples)
    fisher = jax.jit(lambda p, b: ewc.fisher_diagonal(
        _example_loss(model, variables, task, config.train), p, b, chunk_size=chunk))(state.params, sample)
    opt_state = registry.replace_state(
        opt_state, ewc.EwcState, lambda s: ewc.consolidate(s, state.params, fisher, strategy.ewc.decay))
  if 'mas' in names:
    sample = jax.tree.map(lambda x: x[:strategy.mas.samples], examples)
    importance = jax.jit(lambda p, b: mas.importance(
        _example_output(model, variables, task), p, b, chunk_size=chunk))(state.params, sample)
    opt_state = registry.replace_state(
        opt_state, mas.MasState, lambda s: mas.consolidate(s, state.params, importance))
  if 'si' in names:
    opt_state = registry.replace_state(opt_state, si.SiState, lambda s: si.consolidate(s, state.params))
  if 'l2' in names:
    opt_state = registry.replace_state(opt_state, l2.L2State, lambda s: l2.consolidate(s, state.params))
  memories = dict(context.memories)
  store_outputs = 'der' in names  # At the end of the stage: the trainer's steps read the memory, never write it.
  if steps.SHARED in memories:  # One memory for all tasks: this task's examples join the earlier ones.
    # Exactly memory_size rows (a short sample repeats), so that task k owns rows k*m..(k+1)*m (GEM's blocks).
    n = len(examples['valid'])
    kept = jax.tree.map(lambda x: x[np.arange(memory_size(config)) % n], examples)
    kept = with_outputs(model, variables, task, kept) if store_outputs else kept
    memories[steps.SHARED] = replay.append(memories[steps.SHARED], kept)
  elif task in memories and not config.train.get('joint'):  # Joint: the memories already hold every example.
    capacity = jax.tree.leaves(memories[task].data)[0].shape[0]
    kept = jax.tree.map(lambda x: x[:capacity], examples)
    kept = with_outputs(model, variables, task, kept) if store_outputs else kept
    memories[task] = replay.append(memories[task], kept)
  teacher = parallel.copy_tree(variables) if 'lwf' in names else context.teacher
  return state._replace(opt_state=opt_state), steps.Context(memories=memories, teacher=teacher)
