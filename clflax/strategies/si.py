"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017).

During a task, each parameter's contribution to the drop in loss is integrated
along the optimisation path, omega += -g_t * (theta_{t+1} - theta_t), with g_t
the raw task gradient. At task end `consolidate` turns it into an importance
omega / (delta^2 + damping), delta = total move over the task.

The transform sees the raw gradient only if it comes FIRST in the chain (the
registry puts it there). It never sees theta_{t+1}, so it keeps (theta_t, g_t)
and books step t at the next call, when params = theta_{t+1}; `consolidate`
books the last step from the final params, so no step is lost.

Penalty: 0.5 * strength * sum(importance * (theta - anchor)^2), i.e. strength
is 2c for the paper's c * sum(Omega * (theta - theta*)^2).

Omega only grows from task to task, and plain SGD at rate lr on a quadratic of
stiffness k = strength * Omega diverges once lr * k > 2 (each step overshoots
the anchor by more than it corrects). `max_stiffness` caps k per parameter;
1 / lr is the natural cap: such a step lands exactly on the anchor, the most
any explicit step can usefully pull.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import _quadratic
from clflax.strategies import base

PyTree = Any


class SiState(NamedTuple):
  importance: PyTree   # Omega, accumulated over consolidated tasks.
  anchor: PyTree       # Parameters at the last consolidation (task start).
  omega: PyTree        # Path integral of the current task so far.
  prev_params: PyTree  # theta_t of the last update call.
  prev_grads: PyTree   # Raw gradient g_t of the last update call.
  damping: jax.Array   # xi in omega / (delta^2 + xi); kept for consolidate.


def _book_last_step(state: SiState, params: PyTree) -> PyTree:
  """omega - g_t * (params - theta_t): adds the step that led to params."""
  return jax.tree.map(lambda w, g, p, q: w - g * (p - q).astype(w.dtype),
                      state.omega, state.prev_grads, params, state.prev_params)


def si(strength: float, damping: float = 0.1, max_stiffness: float = 0.0
       ) -> optax.GradientTransformationExtraArgs:
  """SI as an optax transform; put it first in the chain (raw gradients).

  max_stiffness > 0 caps strength * Omega per parameter (0: no cap).
  """
  _quadratic.check_strength('si', strength)
  if not damping > 0:
    raise ValueError(f'si: damping must be > 0, got {damping}')
  if not max_stiffness >= 0:
    raise ValueError(f'si: max_stiffness must be >= 0, got {max_stiffness}')
  capped = max_stiffness > 0 and strength > 0

  def weight_of(importance):
    if not capped:
      return importance
    return jax.tree.map(lambda w: jnp.minimum(w, max_stiffness / strength), importance)

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return SiState(importance=zeros, anchor=params, omega=zeros,
                   prev_params=params, prev_grads=zeros,
                   damping=jnp.asarray(damping, jnp.float32))

  def update_fn(updates, state, params=None, **extra):
    del extra
    params = _quadratic.require_params('si', params)
    grads = jax.tree.map(lambda g, z: g.astype(z.dtype), updates,
                         state.prev_grads)  # Keep the state's dtypes stable.
    state = state._replace(omega=_book_last_step(state, params),
                           prev_params=params, prev_grads=grads)
    updates = _quadratic.add_penalty_grad(updates, params, state.anchor,
                                          weight_of(state.importance), strength)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def penalty(params: PyTree, anchor: PyTree, importance: PyTree) -> jax.Array:
  """0.5 * sum(importance * (params - anchor)^2)."""
  return _quadratic.penalty(params, anchor, importance)


def consolidate(state: SiState, params: PyTree) -> SiState:
  """importance += omega / ((params - anchor)^2 + damping); re-anchor; reset.

  `params` are the parameters at the end of the task (after the last update).
  """
  omega = _book_last_step(state, params)
  importance = jax.tree.map(
      lambda i, w, p, a: i + w / (jnp.square(p - a).astype(w.dtype)
                                  + state.damping.astype(w.dtype)),
      state.importance, omega, params, state.anchor)
  zeros = jax.tree.map(jnp.zeros_like, omega)
  return SiState(importance=importance, anchor=params, omega=zeros,
                 prev_params=params, prev_grads=zeros, damping=state.damping)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.strength = 0.1  # Penalty strength (2c in Zenke et al.'s notation).
  c.damping = 0.1  # xi in Omega = omega / (delta^2 + xi).
  c.max_stiffness = 0.0  # Cap on strength * Omega per parameter (0: none); 1/lr keeps plain SGD stable.
  return c


STRATEGY = base.Strategy(
    name='si', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'si', cfg, {'strength': {}, 'damping': {'positive': True}, 'max_stiffness': {}}),
    transform=lambda cfg, stage: si(cfg.strength, cfg.damping, cfg.max_stiffness),
    end_stage=lambda cfg, state, end: state._replace(opt_state=base.replace_state(
        state.opt_state, SiState, lambda s: consolidate(s, state.params))))
