"""The pure, jittable steps: one train step per head (task static) and one eval step per head.

A train step sees the current task's batch and what earlier stages left behind (`Context`). It knows no strategy
by name: it builds the `StepContext` the strategies read (strategies/base.py) and calls, for each active strategy,
its loss terms inside the gradient, then its extra `tx.update` arguments (A-GEM's reference gradient, GEM's
per-task gradients), so any chain of strategies runs through one `tx.update`. A strategy with an update of its own
(MER) replaces the gradient step.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax import tasks
from clflax.strategies import base
from clflax.strategies import memory
from clflax.strategies import registry
from clflax.trainer.state import Context
from clflax.trainer.state import TrainState


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def forward(model, params, batch_stats, batch, task, rng, train):
  """Head `task` on `batch`; multi-head classic models also read each example's head id (`batch['head']`).

  Mixed precision: with a model `dtype` other than float32 the parameters are cast to it for this pass (their
  gradients come back float32, through the cast), the batch-norm statistics stay float32 and the outputs are cast
  to float32, so losses, metrics and every strategy's arithmetic are float32."""
  dtype = jnp.dtype(getattr(model, 'dtype', jnp.float32))
  mixed = dtype != jnp.float32
  variables = {'params': _cast_floats(params, dtype) if mixed else params, 'batch_stats': batch_stats}
  extra = {'head': batch['head']} if 'head' in batch else {}
  if not train:
    outputs = model.apply(variables, batch['image'], task=task, train=False, **extra)
    return (_cast_floats(outputs, jnp.float32) if mixed else outputs), batch_stats
  outputs, updates = model.apply(variables, batch['image'], task=task, train=True, mutable=['batch_stats'],
                                 rngs={'dropout': rng}, **extra)
  return (_cast_floats(outputs, jnp.float32) if mixed else outputs), updates.get('batch_stats', batch_stats)


def step_context(model, state: TrainState, batch: dict, context: Context, task: str, earlier: tuple,
                 config: ml_collections.ConfigDict) -> base.StepContext:
  """What the strategies see in this step (the main forward's `outputs` are filled in once computed)."""
  def apply(params, b, head, key):
    return forward(model, params, state.batch_stats, b, head, key, train=True)[0]

  def apply_frozen(variables, b, head):
    return forward(model, variables['params'], variables['batch_stats'], b, head, None, train=False)[0]

  return base.StepContext(
      task=task, earlier=tuple(earlier), batch=batch, outputs=None, memories=context.memories,
      teacher=context.teacher, opt_state=state.opt_state, config=config, apply=apply, apply_frozen=apply_frozen,
      loss=lambda head, outputs, b: tasks.loss(head, outputs, b, config.train), distill=tasks.distill)


def train_step(state: TrainState, batch: dict, context: Context, *, model, tx: optax.GradientTransformation,
               task: str, earlier: tuple[str, ...], config: ml_collections.ConfigDict):
  """One optimisation step of head `task`; returns (new state, metrics). Pure: jit it with `task` fixed.

  With `train.joint` (the multi-task upper bound, not a strategy) `earlier` is every other task and its memory
  its whole training set: each step also trains every other head on a batch of it.
  """
  strategies = registry.resolve(config.strategy.names)
  cfgs = {s.name: registry.section(config.strategy, s) for s in strategies}
  rng, drop_key, step_key = jax.random.split(state.rng, 3)
  keys = {s.name: base.key_for(step_key, s.name) for s in strategies}
  ctx = step_context(model, state, batch, context, task, earlier, config)
  for s in strategies:
    if s.replace_update is not None:  # Validated to be the only strategy.
      params, metrics = s.replace_update(cfgs[s.name], ctx, state.params, keys[s.name])
      return state._replace(step=state.step + 1, params=params, rng=rng), metrics
  own_loss = [s for s in strategies if s.task_loss is not None]

  def loss_fn(params):
    outputs, new_stats = forward(model, params, state.batch_stats, batch, task, drop_key, train=True)
    now = ctx._replace(outputs=outputs)
    if own_loss:
      task_loss = own_loss[0].task_loss(cfgs[own_loss[0].name], now, params, keys[own_loss[0].name])
      parts = {f'{own_loss[0].name}_task': task_loss}
    else:
      task_loss, parts = tasks.loss(task, outputs, batch, config.train)
    total = config.train.loss_weights[task] * task_loss
    for s in strategies:
      if s.loss_terms is not None:
        terms = s.loss_terms(cfgs[s.name], now, params, keys[s.name])
        parts.update(terms)
        total += sum(terms.values())
    if config.train.joint and earlier:
      parts['joint'] = len(earlier) * memory.memory_loss(now, params, base.key_for(step_key, 'joint'),
                                                         config.train.batch_size)
      total += parts['joint']
    parts['total'] = total
    return total, (parts, new_stats, outputs)

  grads, (parts, new_stats, outputs) = jax.grad(loss_fn, has_aux=True)(state.params)
  after = ctx._replace(outputs=jax.lax.stop_gradient(outputs))
  extra = {}
  for s in strategies:
    if s.update_args is not None:
      args = s.update_args(cfgs[s.name], after, state.params, keys[s.name])
      clash = set(args) & set(extra)
      if clash:
        raise ValueError(f'strategy {s.name} passes {sorted(clash)} to tx.update, as another strategy does')
      extra.update(args)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts, grad_norm=optax.tree.norm(grads))
  return TrainState(state.step + 1, params, new_stats, opt_state, rng), metrics


def balance_step(state: TrainState, context: Context, *, model, tx: optax.GradientTransformation,
                 all_tasks: tuple[str, ...], config: ml_collections.ConfigDict):
  """One step of the final balancing fine-tune: every task's loss on a memory batch of `train.batch_size`, each
  through its own head (one shared memory: one batch drawn across all tasks), averaged; `tx` is a plain base
  optimizer, as no task is left out of the loss for a strategy to protect. Batch-norm statistics stay as the stages
  left them (the memories are small)."""
  rng, key = jax.random.split(state.rng)
  ctx = step_context(model, state, {}, context, all_tasks[-1], all_tasks, config)
  loss, grads = jax.value_and_grad(
      lambda p: memory.memory_loss(ctx, p, key, config.train.batch_size, heads=all_tasks))(state.params)
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


def jit_device_evaluation(model, task, max_detections, batch_fn, num_batches):
  """Every requested task's evaluation as one compiled call: `lax.map` over task ids, and within a task over its
  `num_batches` padded batches from `batch_fn(source, task_id, batch_index)`. Returns per task the eval summaries
  summed over its batches, so only for tasks whose summaries add up (counts). The model must not depend on the
  static `task` (the classic MLP's heads come per example)."""
  def task_sums(variables, source, task_id):
    def one_batch(b):
      return eval_step(variables, batch_fn(source, task_id, b), model=model, task=task, max_detections=max_detections)
    return jax.tree.map(lambda x: jnp.sum(x, 0), jax.lax.map(one_batch, jnp.arange(num_batches)))

  def evaluate(variables, source, task_ids):
    return jax.lax.map(lambda t: task_sums(variables, source, t), task_ids)

  return jax.jit(evaluate)


def jit_eval_step(model, task, max_detections, out_sharding=None):
  """The eval step of one head; with `out_sharding` (replicated on the mesh) every process gets every output."""
  step = functools.partial(eval_step, model=model, task=task, max_detections=max_detections)
  return jax.jit(step) if out_sharding is None else jax.jit(step, out_shardings=out_sharding)
