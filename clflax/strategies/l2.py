"""L2 anchor: pulls all weights uniformly towards the previous task's weights.

The baseline the weighted penalties (EWC, MAS, SI) are compared against.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clflax.strategies import _quadratic

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
