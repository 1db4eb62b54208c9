"""L2 anchor: pulls all weights uniformly towards the previous task's weights.

The baseline the weighted penalties (EWC, MAS, SI) are compared against.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import _quadratic
from clflax.strategies import base

PyTree = Any


class L2State(NamedTuple):
  anchor: PyTree     # Parameters at the last consolidation.
  active: jax.Array  # float32 scalar: 0 before the first consolidation, else 1.


def penalty(params: PyTree, anchor: PyTree) -> jax.Array:
  """0.5 * ||params - anchor||^2 over all leaves."""
  ones = jax.tree.map(lambda a: jnp.ones((), a.dtype), anchor)
  return _quadratic.penalty(params, anchor, ones)


def l2(strength: float) -> optax.GradientTransformationExtraArgs:
  """Adds strength * (params - anchor) once a task has been consolidated."""
  def init_fn(params):
    return L2State(anchor=params, active=jnp.zeros((), jnp.float32))

  return _quadratic.penalty_transform(
      'l2', strength, init_fn,
      lambda s: jax.tree.map(lambda _: s.active, s.anchor))


def consolidate(state: L2State, params: PyTree) -> L2State:
  """Re-anchors at params and switches the penalty on."""
  del state
  return L2State(anchor=params, active=jnp.ones((), jnp.float32))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.strength = 0.01  # Uniform pull towards the previous task's weights.
  return c


STRATEGY = base.Strategy(
    name='l2', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields('l2', cfg, {'strength': {}}),
    transform=lambda cfg, stage: l2(cfg.strength),
    end_stage=lambda cfg, state, end: state._replace(opt_state=base.replace_state(
        state.opt_state, L2State, lambda s: consolidate(s, state.params))))
