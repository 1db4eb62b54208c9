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
import optax

from clflax.strategies import _quadratic

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
