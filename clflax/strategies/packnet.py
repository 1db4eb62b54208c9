"""PackNet (Mallya & Lazebnik 2018): packing tasks into one network by pruning.

Every weight has an owner: the task whose training fixed it, or -1 (free).
For task t:
  1. `start_task`: t owns the free weights it may use (`where`, e.g. the
     backbone and its own head) and trains only those; weights of earlier
     tasks stay frozen but are used in the forward pass.
  2. `prune`: in each prunable layer, the `fraction` of t's weights with the
     smallest magnitude are zeroed and freed for later tasks (per-layer
     magnitude pruning, as in the paper).
  3. Retrain briefly: only t's remaining weights move; freed ones stay 0.
At inference on task t, `task_params` keeps the weights of tasks <= t and
zeroes the rest (later tasks' weights would otherwise change t's function).

Frozen means the FINAL update is zero: put `packnet()` LAST in the chain
(after the base optimizer), so momentum or weight decay cannot move a frozen
weight. `optax.masked` only masks whole leaves, hence a transform of its own.

Biases, BatchNorm scales/offsets (any leaf that is not `prunable`, by default
the 1-D ones) are never pruned: the first task that claims them owns them, so
they are trained by that task and fixed afterwards, the paper's choice.
BatchNorm running statistics are not parameters: keep them fixed after the
first task (train=False in BN) or snapshot them per task.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import base

PyTree = Any
FREE = -1


class PackNetState(NamedTuple):
  owners: PyTree   # int32 per weight, like params: task id, or -1 if free.
  task: jax.Array  # int32 scalar: the task being trained.


def init_owners(params: PyTree) -> PyTree:
  """Every weight free (-1)."""
  return jax.tree.map(lambda p: jnp.full(jnp.shape(p), FREE, jnp.int32), params)


def claim(owners: PyTree, task, where: Optional[PyTree] = None) -> PyTree:
  """Owners with task `task` owning the selected weights no earlier task owns.

  Weights of tasks < task are kept; every other weight becomes `task`'s if
  `where` selects it, else free. `where`: None (all) or a pytree like params
  of bools (per leaf, or per weight). Idempotent: re-running a task resets
  its ownership.
  """
  if where is None:
    where = jax.tree.map(lambda o: True, owners)
  if jax.tree.structure(where) != jax.tree.structure(owners):
    raise ValueError('where must have the structure of the params: '
                     f'{jax.tree.structure(where)} vs {jax.tree.structure(owners)}')

  def one(o, w):
    earlier = (o >= 0) & (o < task)
    return jnp.where(earlier, o, jnp.where(w, task, FREE)).astype(jnp.int32)
  return jax.tree.map(one, owners, where)


def start_task(state: PackNetState, task, where: Optional[PyTree] = None
               ) -> PackNetState:
  """State for training `task`: see `claim`."""
  return PackNetState(claim(state.owners, task, where),
                      jnp.asarray(task, jnp.int32))


def _default_prunable(leaf) -> bool:
  return jnp.ndim(leaf) >= 2  # Kernels; not biases or norm parameters.


def prune(params: PyTree, owners: PyTree, task, fraction,
          prunable: Optional[Callable[[Any], bool]] = None):
  """Frees the smallest-magnitude `fraction` of `task`'s weights, per layer.

  In each prunable leaf with n weights owned by `task`, exactly
  floor(fraction * n) of them (smallest |w|; ties by position) are zeroed
  and become free. Returns (params, owners).

  prunable: leaf -> bool (static, from shape); default ndim >= 2.
  """
  if isinstance(fraction, (int, float)) and not 0 <= fraction < 1:
    raise ValueError(f'packnet: fraction must be in [0, 1), got {fraction}')
  if jax.tree.structure(params) != jax.tree.structure(owners):
    raise ValueError('owners must have the structure of the params: '
                     f'{jax.tree.structure(owners)} vs {jax.tree.structure(params)}')
  prunable = _default_prunable if prunable is None else prunable

  def one(p, o):
    if jnp.shape(p) != jnp.shape(o):
      raise ValueError(f'owners leaf shape {jnp.shape(o)} does not match the '
                       f'param shape {jnp.shape(p)}')
    if not prunable(p):
      return p, o
    mine = jnp.ravel(o == task)
    n = jnp.sum(mine.astype(jnp.int32))
    k = jnp.floor(fraction * n.astype(jnp.float32)).astype(jnp.int32)
    score = jnp.where(mine, jnp.abs(jnp.ravel(p)).astype(jnp.float32), jnp.inf)
    order = jnp.argsort(score, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
    pruned = (mine & (rank < k)).reshape(jnp.shape(p))
    return (jnp.where(pruned, jnp.zeros_like(p), p),
            jnp.where(pruned, FREE, o).astype(jnp.int32))

  pairs = jax.tree.map(one, params, owners)
  outer = jax.tree.structure(params)
  return jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)


def freeze_mask(owners: PyTree, task) -> PyTree:
  """Bool per weight: True where the update must be zero (not `task`'s)."""
  return jax.tree.map(lambda o: o != task, owners)


def task_params(params: PyTree, owners: PyTree, task) -> PyTree:
  """Params for inference on `task`: weights of tasks 0..task, others 0."""
  return jax.tree.map(
      lambda p, o: jnp.where((o >= 0) & (o <= task), p, jnp.zeros_like(p)),
      params, owners)


def packnet() -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of every weight the current task does not own.

  Initially task 0 owns every weight (plain training); call `start_task`
  (through `base.replace_state`) to restrict task 0 to some weights or
  to begin a later task, and `prune` between training and retraining.
  Put it LAST in the chain. `update(updates, state, params=None, **extra)`.
  """
  def init_fn(params):
    owners = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params)
    return PackNetState(owners, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    frozen = freeze_mask(state.owners, state.task)
    updates = jax.tree.map(lambda u, f: jnp.where(f, jnp.zeros_like(u), u),
                           updates, frozen)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()  # Task-specific weights at inference.
  c.prune_fraction = 0.75  # Fraction of each task's weights per layer freed for later tasks after its stage.
  c.retrain_epochs = 1  # Epochs of retraining the kept weights after pruning.
  return c


def _validate(cfg, names, config=None):
  base.check_fields('packnet', cfg, {'prune_fraction': {'below': 1.0}, 'retrain_epochs': {'integer': True}})
  if config is not None:
    base.require_classic('packnet', config, "the vision backbone's batch-norm statistics are shared by every "
                         "task, so its per-task weights would not give back each task's function")
    if config.train.balance_finetune_steps:
      raise ValueError("invalid config: config.train.balance_finetune_steps with packnet: the fine-tune would move "
                       "every task's frozen weights")


def _finish_training(cfg, state, stage):
  """After stage `stage` trained: frees the `prune_fraction` smallest of its weights per layer (zeroed); the
  trainer then retrains the kept ones for `retrain_epochs` more epochs."""
  owners = base.find_state(state.opt_state, PackNetState).owners
  params, owners = prune(state.params, owners, stage, cfg.prune_fraction)
  opt_state = base.replace_state(state.opt_state, PackNetState, lambda s: s._replace(owners=owners))
  return state._replace(params=params, opt_state=opt_state), cfg.retrain_epochs


STRATEGY = base.Strategy(
    name='packnet', config=default_config, validate=_validate,
    transform=lambda cfg, stage: packnet(), phase='update',  # Last: momentum or weight decay must not move a
    # frozen weight either.
    start_stage=lambda cfg, state, stage: state._replace(opt_state=base.replace_state(
        state.opt_state, PackNetState, lambda s: start_task(s, stage))),
    finish_training=_finish_training,
    eval_params=lambda cfg, params, opt_state, stage: task_params(
        params, base.find_state(opt_state, PackNetState).owners, stage))
