"""The pure, jittable steps: one train step per head (task static) and one eval step per head.

A train step sees the current task's batch and what earlier stages left behind (`Context`: episodic memories per
task and the previous model for LwF). Replay's and DER's memory batches, A-GEM's reference gradient and GEM's
per-task gradients go through each earlier task's own head inside the same compiled step; the strategies' optax
transforms receive `ref_grads=` / `task_grads=` as extra arguments, so any chain of strategies runs through one
`tx.update`.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax import tasks
from clflax.strategies import der
from clflax.strategies import mer
from clflax.strategies import registry
from clflax.strategies import replay
from clflax.strategies import tagem

PyTree = Any


class TrainState(NamedTuple):
  step: jax.Array  # Global optimisation step, across stages.
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree  # Base optimizer + every strategy's NamedTuple state.
  rng: jax.Array


class Context(NamedTuple):
  """What earlier stages left for later ones; read by the step, never trained."""
  # task -> replay.ReplayBuffer of that task's examples (empty until its stage ends); with DER each example also holds
  # the model's outputs at the end of its stage (`der.LOGITS`). Classic benchmarks: one SHARED buffer instead.
  memories: dict
  teacher: dict  # {'params', 'batch_stats'} after the previous stage (LwF's teacher).


def forward(model, params, batch_stats, batch, task, rng, train):
  """Head `task` on `batch`; multi-head classic models also read each example's head id (`batch['head']`)."""
  variables = {'params': params, 'batch_stats': batch_stats}
  extra = {'head': batch['head']} if 'head' in batch else {}
  if not train:
    return model.apply(variables, batch['image'], task=task, train=False, **extra), batch_stats
  outputs, updates = model.apply(variables, batch['image'], task=task, train=True, mutable=['batch_stats'],
                                 rngs={'dropout': rng}, **extra)
  return outputs, updates.get('batch_stats', batch_stats)


SHARED = 'shared'  # Context.memories key of the one memory that tasks with a common head share.


def memory_tasks(context: Context, earlier: tuple[str, ...]) -> bool:
  """Whether the step has any memory to learn from (statically known)."""
  return bool(earlier) or SHARED in context.memories


def _memory_loss(model, params, batch_stats, context, earlier, task, key, batch_size, train_cfg):
  """Loss on memory batches. Per-task memories (vision): the mean over earlier tasks of their weighted loss, each
  through its own head. One shared memory (classic benchmarks): `batch_size` examples drawn from all earlier tasks
  together, zero while the memory is still empty."""
  if SHARED in context.memories:
    memory = context.memories[SHARED]
    sample_key, drop_key = jax.random.split(key)
    batch = replay.sample(memory, sample_key, batch_size)
    outputs, _ = forward(model, params, batch_stats, batch, task, drop_key, train=True)
    return jnp.where(replay.size(memory) > 0, tasks.loss(task, outputs, batch, train_cfg)[0], 0.0)
  total = 0.0
  for old_task, task_key in zip(earlier, jax.random.split(key, len(earlier))):
    sample_key, drop_key = jax.random.split(task_key)
    batch = replay.sample(context.memories[old_task], sample_key, batch_size)
    outputs, _ = forward(model, params, batch_stats, batch, old_task, drop_key, train=True)
    old_loss, _ = tasks.loss(old_task, outputs, batch, train_cfg)
    total += train_cfg.loss_weights[old_task] * old_loss
  return total / len(earlier)


def _shared_blocks(memory: replay.ReplayBuffer, config: ml_collections.ConfigDict):
  """The classic SHARED memory as [T_max, m] blocks and a [T_max] flag of the filled ones. Stage k appends exactly m
  rows (`consolidate` pads a short sample), so rows k*m..(k+1)*m hold task k: a static layout for every stage."""
  t_max = len(config.tasks)
  capacity = jax.tree.leaves(memory.data)[0].shape[0]
  if capacity % t_max:
    raise ValueError(f'the shared memory holds {capacity} rows, not {t_max} equal task blocks')
  m = capacity // t_max
  blocks = jax.tree.map(lambda d: d.reshape((t_max, m) + d.shape[1:]), memory.data)
  return blocks, memory.size >= (jnp.arange(t_max) + 1) * m


def _gem_task_grads(model, params, batch_stats, context, earlier, task, key, config):
  """GEM's constraints: (gradients of each earlier task's memory loss stacked on a leading task axis, [T] valid).

  Per-task memories (vision): one gradient per earlier task through its own head (T = len(earlier), fixed within
  the stage's compiled step). One SHARED memory (classic): T = T_max blocks, each a task's memory, all computed by
  one `lax.map` whatever the stage (one compilation); a block not yet filled skips its gradient (`lax.cond`).
  """
  gem_cfg, train_cfg = config.strategy.gem, config.train

  def grad_on(batch, head, drop_key):
    def loss(p):
      outputs, _ = forward(model, p, batch_stats, batch, head, drop_key, train=True)
      return tasks.loss(head, outputs, batch, train_cfg)[0]
    return jax.grad(loss)(params)

  if SHARED in context.memories:
    blocks, filled = _shared_blocks(context.memories[SHARED], config)
    rows = min(gem_cfg.memory_per_task, jax.tree.leaves(blocks)[0].shape[1])  # GEM's share if others keep more.
    n = min(gem_cfg.ref_batch_per_task, rows)

    def one(inputs):
      block, ok, task_key = inputs
      pick_key, drop_key = jax.random.split(task_key)
      block = jax.tree.map(lambda d: d[:rows], block)
      if n < rows:  # Without replacement: the n rows with the largest uniform scores.
        _, pick = jax.lax.top_k(jax.random.uniform(pick_key, (rows,)), n)
        block = jax.tree.map(lambda d: d[pick], block)
      return jax.lax.cond(ok, lambda: grad_on(block, task, drop_key),
                          lambda: jax.tree.map(jnp.zeros_like, params))

    return jax.lax.map(one, (blocks, filled, jax.random.split(key, filled.shape[0]))), filled
  grads, valid = [], []
  for old_task, task_key in zip(earlier, jax.random.split(key, len(earlier))):
    sample_key, drop_key = jax.random.split(task_key)
    memory = context.memories[old_task]
    grads.append(grad_on(replay.sample(memory, sample_key, gem_cfg.ref_batch_per_task), old_task, drop_key))
    valid.append(replay.size(memory) > 0)
  return jax.tree.map(lambda *g: jnp.stack(g), *grads), jnp.stack(valid)


def _der_terms(model, params, batch_stats, memory, head, key, der_cfg, train_cfg):
  """alpha * MSE(outputs, stored outputs) + beta * task loss on memory examples of `head`, the two terms on two
  independent samples as in the paper (beta = 0, DER: one sample only). Multi-output heads (detection) average the
  MSE of their outputs."""

  def sample_outputs(sample_key):
    sample_key, drop_key = jax.random.split(sample_key)
    batch, stored = der.split_logits(replay.sample(memory, sample_key, der_cfg.batch))
    return batch, stored, forward(model, params, batch_stats, batch, head, drop_key, train=True)[0]

  logit_key, label_key = jax.random.split(key)
  _, stored, outputs = sample_outputs(logit_key)
  mse = jax.tree.leaves(jax.tree.map(der.logit_loss, outputs, stored))
  total = der_cfg.alpha * sum(mse) / len(mse)
  if der_cfg.beta:
    batch, _, outputs = sample_outputs(label_key)
    total += der_cfg.beta * tasks.loss(head, outputs, batch, train_cfg)[0]
  return total


def _der_loss(model, params, batch_stats, context, earlier, task, key, der_cfg, train_cfg):
  """DER / DER++ replay loss: on the SHARED memory (classic, zero while empty), or the loss-weighted mean over
  earlier tasks of their memories' terms, each through its own head (vision)."""
  if SHARED in context.memories:
    memory = context.memories[SHARED]
    value = _der_terms(model, params, batch_stats, memory, task, key, der_cfg, train_cfg)
    return jnp.where(replay.size(memory) > 0, value, 0.0)
  total = 0.0
  for old_task, task_key in zip(earlier, jax.random.split(key, len(earlier))):
    total += train_cfg.loss_weights[old_task] * _der_terms(
        model, params, batch_stats, context.memories[old_task], old_task, task_key, der_cfg, train_cfg)
  return total / len(earlier)


def _tagem_extra(model, state, batch, task, key, tagem_cfg, train_cfg):
  """TA-A-GEM's reference gradient on its clustering memory (zero while empty) and this step's offer to it."""
  memory = registry.find_state(state.opt_state, tagem.TagemState).memory
  sample_key, drop_key, offer_key = jax.random.split(key, 3)
  ref_batch, _ = tagem.sample(memory, sample_key, tagem_cfg.ref_batch)
  ref_batch = dict(ref_batch, valid=jnp.ones((tagem_cfg.ref_batch,), bool))

  def ref_loss(params):
    outputs, _ = forward(model, params, state.batch_stats, ref_batch, task, drop_key, train=True)
    return tasks.loss(task, outputs, ref_batch, train_cfg)[0]

  filled = tagem.size(memory) > 0
  ref_grads = jax.tree.map(lambda g: jnp.where(filled, g, 0.0), jax.grad(ref_loss)(state.params))
  offer = {k: v for k, v in batch.items() if k != 'valid'}
  return ref_grads, (offer, batch['label'], offer_key, batch['valid'])


def mer_train_step(state: TrainState, batch: dict, context: Context, *, model, task: str,
                   config: ml_collections.ConfigDict):
  """MER's update of one incoming batch: s Reptile batches, each an SGD step on the batch then k - 1 steps on memory
  batches of its size (`mer.mer_step`, plain SGD at `train.learning_rate`; the optax chain is not used). While the
  memory is empty its batches weigh nothing (their steps are no-ops). The one SHARED memory of the classic
  protocols, filled at the end of each stage (not by reservoir over the stream, as in the paper)."""
  mer_cfg, train_cfg = config.strategy.mer, config.train
  rng, key, drop_key = jax.random.split(state.rng, 3)
  memory = context.memories[SHARED]
  s, k, n = mer_cfg.batches, mer_cfg.steps, batch['valid'].shape[0]
  drawn = replay.sample(memory, key, s * max(k - 1, 1) * n)
  drawn = dict(drawn, valid=jnp.logical_and(drawn['valid'], replay.size(memory) > 0))
  drawn = jax.tree.map(lambda x: x.reshape((s, max(k - 1, 1), n) + x.shape[1:])[:, :k - 1], drawn)
  batches = mer.mer_batches(jax.tree.map(lambda x: x[None], batch), drawn)

  def loss_fn(params, b):
    outputs, _ = forward(model, params, state.batch_stats, b, task, drop_key, train=True)  # (Same dropout mask.)
    return tasks.loss(task, outputs, b, train_cfg)[0]

  loss = loss_fn(state.params, batch)
  params = mer.mer_step(state.params, loss_fn, batches, train_cfg.learning_rate, mer_cfg.beta, mer_cfg.gamma)
  return state._replace(step=state.step + 1, params=params, rng=rng), {'ce': loss, 'total': loss}


def train_step(state: TrainState, batch: dict, context: Context, *, model, tx: optax.GradientTransformation,
               task: str, earlier: tuple[str, ...], config: ml_collections.ConfigDict):
  """One optimisation step of head `task`; returns (new state, metrics). Pure: jit it with `task` fixed."""
  strategy, train_cfg = config.strategy, config.train
  names = set(strategy.names)
  if 'mer' in names:
    return mer_train_step(state, batch, context, model=model, task=task, config=config)
  has_memory = memory_tasks(context, earlier)
  rng, drop_key, replay_key, agem_key = jax.random.split(state.rng, 4)
  # Folded from existing keys, so that adding DER / GEM left the other strategies' random streams as they were.
  der_key, gem_key = jax.random.fold_in(replay_key, 1), jax.random.fold_in(agem_key, 1)

  def loss_fn(params):
    outputs, new_stats = forward(model, params, state.batch_stats, batch, task, drop_key, train=True)
    task_loss, parts = tasks.loss(task, outputs, batch, train_cfg)
    total = train_cfg.loss_weights.get(task, 1.0) * task_loss
    if has_memory and 'replay' in names:
      parts['replay'] = _memory_loss(model, params, state.batch_stats, context, earlier, task, replay_key,
                                     strategy.replay.batch, train_cfg)
      total += strategy.replay.weight * parts['replay']
    if earlier and train_cfg.get('joint'):  # `earlier` = every other task, its memory = its whole training set.
      parts['joint'] = len(earlier) * _memory_loss(model, params, state.batch_stats, context, earlier, task,
                                                   replay_key, train_cfg.batch_size, train_cfg)
      total += parts['joint']
    if has_memory and 'der' in names:
      parts['der'] = _der_loss(model, params, state.batch_stats, context, earlier, task, der_key, strategy.der,
                               train_cfg)
      total += parts['der']
    if earlier and 'lwf' in names:
      distill = 0.0
      for old_task in earlier:
        student, _ = forward(model, params, state.batch_stats, batch, old_task, drop_key, train=True)
        teacher, _ = forward(model, context.teacher['params'], context.teacher['batch_stats'], batch,
                              old_task, None, train=False)
        distill += tasks.distill(old_task, student, teacher, strategy.lwf.temperature)
      parts['lwf'] = distill / len(earlier)
      total += strategy.lwf.weight * parts['lwf']
    parts['total'] = total
    return total, (parts, new_stats)

  grads, (parts, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  ref_grads = None
  if has_memory and 'agem' in names:
    ref_grads = jax.grad(_memory_loss, argnums=1)(model, state.params, state.batch_stats, context, earlier, task,
                                                   agem_key, strategy.agem.ref_batch, train_cfg)
  extra = {'ref_grads': ref_grads}
  if 'tagem' in names:  # Task-agnostic: the reference is drawn from all pools, the current task's included.
    extra['ref_grads'], extra['memory_batch'] = _tagem_extra(model, state, batch, task, agem_key, strategy.tagem,
                                                             train_cfg)
  if has_memory and 'gem' in names:
    extra['task_grads'], extra['task_valid'] = _gem_task_grads(model, state.params, state.batch_stats, context,
                                                               earlier, task, gem_key, config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts, grad_norm=optax.tree.norm(grads))
  new_state = TrainState(state.step + 1, params, new_stats, opt_state, rng)
  return new_state, metrics


def balance_step(state: TrainState, context: Context, *, model, tx: optax.GradientTransformation,
                 all_tasks: tuple[str, ...], config: ml_collections.ConfigDict):
  """One step of the final balancing fine-tune: every task's loss on a memory batch of `train.batch_size`, each
  through its own head (one shared memory: one batch drawn across all tasks), averaged; `tx` is a plain base
  optimizer, as no task is left out of the loss for a strategy to protect. Batch-norm statistics stay as the stages
  left them (the memories are small)."""
  rng, key = jax.random.split(state.rng)
  loss, grads = jax.value_and_grad(_memory_loss, argnums=1)(
      model, state.params, state.batch_stats, context, all_tasks, all_tasks[-1], key, config.train.batch_size,
      config.train)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state._replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, rng=rng)
  return new_state, {'total': loss, 'grad_norm': optax.tree.norm(grads)}


def jit_balance_step(model, tx, all_tasks, config):
  step = functools.partial(balance_step, model=model, tx=tx, all_tasks=tuple(all_tasks), config=config)
  return jax.jit(step, donate_argnums=(0,))


def eval_step(variables: dict, batch: dict, *, model, task: str, max_detections: int) -> dict:
  """Per-batch evaluation summaries of head `task` (see tasks.eval_outputs)."""
  outputs, _ = forward(model, variables['params'], variables['batch_stats'], batch, task, None, train=False)
  return tasks.eval_outputs(task, outputs, batch, max_detections)


def jit_train_step(model, tx, task, earlier, config, state_sharding=None, batch_sharding=None):
  """The train step of one head, compiled once; the state's buffers are donated (updated in place)."""
  step = functools.partial(train_step, model=model, tx=tx, task=task, earlier=tuple(earlier), config=config)
  if state_sharding is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, donate_argnums=(0,), in_shardings=(state_sharding, batch_sharding, state_sharding),
                 out_shardings=(state_sharding, None))


def jit_scan_epoch(model, tx, task, earlier, config, batch_fn, num_steps):
  """A whole epoch as one compiled `lax.scan` over `num_steps` train steps (no Python per step).

  `batch_fn(source, task_id, epoch, step)` builds each step's batch on device from `source` (e.g. the MNIST image
  pool with per-task permutations), so the epoch's data never crosses from the host. Returns per-step metrics.
  """
  step = functools.partial(train_step, model=model, tx=tx, task=task, earlier=tuple(earlier), config=config)

  def epoch_fn(state, context, source, task_id, epoch):
    def body(carry, i):
      return step(carry, batch_fn(source, task_id, epoch, i), context)
    return jax.lax.scan(body, state, jnp.arange(num_steps))

  return jax.jit(epoch_fn, donate_argnums=(0,))


def jit_eval_step(model, task, max_detections):
  return jax.jit(functools.partial(eval_step, model=model, task=task, max_detections=max_detections))


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
