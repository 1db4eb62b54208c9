"""Memory Aware Synapses (Aljundi et al. 2018).

Importance of a parameter = how much the squared L2 norm of the network's
output moves when it changes, averaged over (unlabelled) examples. No labels
are needed, so it can be estimated on any data of the finished task.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from clflax.strategies import _quadratic

PyTree = Any


class MasState(NamedTuple):
  importance: PyTree  # Accumulated importance Omega over consolidated tasks.
  anchor: PyTree      # Parameters at the last consolidation.


def importance(output_fn: Callable[[PyTree, PyTree], PyTree], params: PyTree,
               batch: PyTree, *, chunk_size: Optional[int] = None) -> PyTree:
  """Mean over examples of |d/dtheta ||output_fn(params, example)||_2^2|.

  Args:
    output_fn: output_fn(params, example) -> array (or pytree of arrays) for ONE
      example; its squared norm sums over all output leaves.
    params: parameters the importance is evaluated at.
    batch: pytree whose leaves share a leading axis N.
    chunk_size: optional chunking as in `ewc.fisher_diagonal` (exact for any N).
  """
  def sq_norm(p, example):
    out = jax.tree.leaves(output_fn(p, example))
    return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in out)

  grad_fn = jax.grad(sq_norm)

  def abs_grad(p, example):
    return jax.tree.map(jnp.abs, grad_fn(p, example))

  return _quadratic.per_example_mean(abs_grad, params, batch, chunk_size)


def penalty(params: PyTree, anchor: PyTree, importance: PyTree) -> jax.Array:
  """0.5 * sum(importance * (params - anchor)^2)."""
  return _quadratic.penalty(params, anchor, importance)


def mas(strength: float) -> optax.GradientTransformationExtraArgs:
  """Adds strength * importance * (params - anchor); identity until consolidated."""
  def init_fn(params):
    return MasState(importance=jax.tree.map(jnp.zeros_like, params),
                    anchor=params)

  return _quadratic.penalty_transform('mas', strength, init_fn,
                                      lambda s: s.importance)


def consolidate(state: MasState, params: PyTree, importance: PyTree,
                decay: float = 1.0) -> MasState:
  """importance <- decay * old + new; anchor <- params."""
  return MasState(importance=_quadratic.merge(state.importance, importance,
                                              decay),
                  anchor=params)
