"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), online form.

The trainer estimates a diagonal Fisher at the end of a task (`fisher_diagonal`,
exact per-example; or the A-GEM authors' running average of squared mini-batch
gradients, `running_fisher` + `normalize_fisher`) and merges it into the
transform's state with `consolidate`. The `ewc` transform then adds the gradient
of strength * penalty to the task gradient.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import _quadratic
from clflax.strategies import base

PyTree = Any


class EwcState(NamedTuple):
  fisher: PyTree  # Diagonal Fisher summed over consolidated tasks (online EWC).
  anchor: PyTree  # Parameters at the last consolidation.


def fisher_diagonal(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                    params: PyTree, batch: PyTree, *,
                    chunk_size: Optional[int] = None) -> PyTree:
  """Empirical Fisher diagonal: mean over examples of squared per-example grads.

  Args:
    loss_fn: loss_fn(params, example) -> scalar, for ONE example (no batch axis).
    params: parameters the Fisher is evaluated at.
    batch: pytree whose leaves share a leading axis N.
    chunk_size: if set, process chunk_size examples at a time (jax.lax.scan), to
      bound memory; N need not be a multiple of it.
  """
  grad_fn = jax.grad(loss_fn)

  def squared_grad(p, example):
    return jax.tree.map(jnp.square, grad_fn(p, example))

  return _quadratic.per_example_mean(squared_grad, params, batch, chunk_size)


def penalty(params: PyTree, anchor: PyTree, fisher: PyTree) -> jax.Array:
  """0.5 * sum(fisher * (params - anchor)^2)."""
  return _quadratic.penalty(params, anchor, fisher)


def ewc(strength: float) -> optax.GradientTransformationExtraArgs:
  """Adds strength * fisher * (params - anchor) to the updates.

  Starts with a zero Fisher, so it is the identity until the first
  `consolidate`. Needs `params` in `update`.
  """
  def init_fn(params):
    return EwcState(fisher=jax.tree.map(jnp.zeros_like, params), anchor=params)

  return _quadratic.penalty_transform('ewc', strength, init_fn,
                                      lambda s: s.fisher)


def consolidate(state: EwcState, params: PyTree, fisher: PyTree,
                decay: float = 1.0) -> EwcState:
  """Online EWC: fisher <- decay * old + new; anchor <- params.

  decay=1 sums the tasks' Fishers (one penalty per task around the latest
  anchor), decay=0 keeps only the newest task's Fisher.
  """
  return EwcState(fisher=_quadratic.merge(state.fisher, fisher, decay),
                  anchor=params)


def running_fisher(acc: PyTree, grads: PyTree, decay: float = 0.9) -> PyTree:
  """Running average of squared mini-batch gradients: decay*acc + (1-decay)*g^2.

  The A-GEM authors' cheap EWC estimator: called by the trainer every few
  steps during a task (from zeros), then `normalize_fisher` at task end.
  """
  return jax.tree.map(
      lambda a, g: decay * a + (1.0 - decay) * jnp.square(g).astype(a.dtype),
      acc, grads)


def normalize_fisher(fisher: PyTree) -> PyTree:
  """Scales the Fisher into [0, 1] by its global max over all leaves.

  An all-zero Fisher is returned unchanged (nothing to normalise).
  """
  leaves = jax.tree.leaves(fisher)
  if not leaves:
    return fisher
  top = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
  scale = jnp.where(top > 0, 1.0 / jnp.where(top > 0, top, 1.0), 1.0)
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), fisher)


class RunningFisherState(NamedTuple):
  acc: PyTree  # Running average of squared mini-batch gradients of the current task.
  count: jax.Array  # Updates seen this task.


def running_fisher_tracker(decay: float = 0.9, every: int = 10) -> optax.GradientTransformationExtraArgs:
  """Tracks the authors' Fisher estimate from the raw gradients (every `every` steps); updates pass unchanged.

  Put it before any transform that changes the gradient (the registry does). At a task's end the trainer turns
  `acc` into the Fisher with `normalize_fisher` and resets the tracker (`reset_running`).
  """
  def init_fn(params):
    return RunningFisherState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    acc = jax.lax.cond(state.count % every == 0, lambda a: running_fisher(a, updates, decay), lambda a: a, state.acc)
    return updates, RunningFisherState(acc, state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reset_running(state: RunningFisherState) -> RunningFisherState:
  return RunningFisherState(jax.tree.map(jnp.zeros_like, state.acc), jnp.zeros((), jnp.int32))


FISHER_MODES = ('exact', 'running')
CHUNK = 4  # Per-example gradients of this many examples at a time: bounded memory for big backbones.


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.strength = 100.  # lambda: penalty 0.5 * lambda * sum F (theta - theta*)^2.
  c.decay = 1.0  # Online EWC: F = decay * F_old + F_new (0 keeps the newest).
  c.fisher = 'exact'  # 'exact' per-example Fisher, or 'running' (A-GEM authors').
  c.fisher_samples = 64  # Examples of the finished task for the exact Fisher.
  return c


def _validate(cfg, names, config=None):
  del names, config
  base.check_fields('ewc', cfg, {'strength': {}, 'decay': {'upper': 1.0}, 'fisher': FISHER_MODES,
                                 'fisher_samples': {'positive': True, 'integer': True}})


def _transform(cfg, stage):
  """The penalty; with the running estimator, its tracker first (it reads the gradient as it arrives)."""
  del stage
  penalty_tx = ewc(cfg.strength)
  return optax.chain(running_fisher_tracker(), penalty_tx) if cfg.fisher == 'running' else penalty_tx


def _end_stage(cfg, state, end):
  """The finished task's Fisher (exact per-example on a sample, or the running estimate scaled to [0, 1]),
  merged into the penalty's state around the current parameters."""
  opt_state = state.opt_state
  if cfg.fisher == 'running':  # Replaced each task, as the authors do.
    fisher = normalize_fisher(base.find_state(opt_state, RunningFisherState).acc)
    opt_state = base.replace_state(opt_state, RunningFisherState, reset_running)
  else:
    sample = jax.tree.map(lambda x: x[:cfg.fisher_samples], end.examples)
    fisher = jax.jit(lambda p, b: fisher_diagonal(end.example_loss, p, b, chunk_size=CHUNK))(state.params, sample)
  opt_state = base.replace_state(opt_state, EwcState, lambda s: consolidate(s, state.params, fisher, cfg.decay))
  return state._replace(opt_state=opt_state)


STRATEGY = base.Strategy(
    name='ewc', config=default_config, validate=_validate,
    needs=lambda cfg: base.Needs(examples=cfg.fisher_samples if cfg.fisher == 'exact' else 0),
    transform=_transform, end_stage=_end_stage)
