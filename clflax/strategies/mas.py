"""Memory Aware Synapses (Aljundi et al. 2018).

Importance of a parameter = how much the squared L2 norm of the network's
output moves when it changes, averaged over (unlabelled) examples. No labels
are needed, so it can be estimated on any data of the finished task.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import _quadratic
from clflax.strategies import base

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


CHUNK = 4  # Per-example gradients of this many examples at a time.


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.strength = 1.0  # lambda of the MAS penalty.
  c.samples = 64  # Examples of the finished task for the importance.
  return c


def _end_stage(cfg, state, end):
  sample = jax.tree.map(lambda x: x[:cfg.samples], end.examples)
  omega = jax.jit(lambda p, b: importance(end.example_outputs, p, b, chunk_size=CHUNK))(state.params, sample)
  opt_state = base.replace_state(state.opt_state, MasState, lambda s: consolidate(s, state.params, omega))
  return state._replace(opt_state=opt_state)


STRATEGY = base.Strategy(
    name='mas', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'mas', cfg, {'strength': {}, 'samples': {'positive': True, 'integer': True}}),
    needs=lambda cfg: base.Needs(examples=cfg.samples),
    transform=lambda cfg, stage: mas(cfg.strength), end_stage=_end_stage)
