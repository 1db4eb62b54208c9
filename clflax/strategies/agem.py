"""Averaged Gradient Episodic Memory (Chaudhry et al. 2019).

If the task gradient g would increase the average loss on the episodic memory
(<g, r> < 0 for the memory's reference gradient r), project it onto the
half-space where it does not: g - (<g, r> / <r, r>) r. The inner products run
over ALL parameters as one flat vector, never leaf by leaf. In the trainer the
reference gradient is that of the mean loss of the earlier tasks' episodic
memories (each through its own head), `ref_batch` examples of each.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import base
from clflax.strategies import memory

PyTree = Any


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product of two pytrees as flat float32 vectors."""
  terms = jax.tree.map(
      lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def project(grads: PyTree, ref_grads: PyTree) -> PyTree:
  """A-GEM projection of grads against ref_grads (same structure).

  Returns grads unchanged when <g, r> >= 0 or r = 0 (e.g. an empty memory);
  float32 subnormal r (flushed to zero by XLA on CPU) counts as r = 0.
  """
  if jax.tree.structure(grads) != jax.tree.structure(ref_grads):
    raise ValueError('ref_grads must have the same tree structure as grads: '
                     f'{jax.tree.structure(ref_grads)} vs '
                     f'{jax.tree.structure(grads)}')
  # The projection only depends on r's direction: rescale r by its largest
  # entry so that <r, r> cannot underflow for tiny (but normal) gradients.
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(r)).astype(jnp.float32)
                           for r in jax.tree.leaves(ref_grads)]))
  scale = 1.0 / jnp.where(top > 0, top, 1.0)
  ref = jax.tree.map(lambda r: r.astype(jnp.float32) * scale, ref_grads)
  dot = _vdot(grads, ref)
  ref_sq = _vdot(ref, ref)
  conflict = (dot < 0) & (ref_sq > 0)
  coef = dot / jnp.where(ref_sq > 0, ref_sq, 1.0)

  def projected(coef):
    return jax.tree.map(lambda g, r: (g - coef * r).astype(g.dtype), grads, ref)

  # A branch, not a select: XLA would copy the test and the sums under it (chains of one scalar add per leaf)
  # into every leaf's projection (B0's A-GEM step then compiled 2.8x as long); without a conflict nothing is
  # computed.
  return jax.lax.cond(conflict, projected, lambda _: grads, coef)


def agem() -> optax.GradientTransformationExtraArgs:
  """Transform projecting the incoming updates with the `ref_grads` extra arg.

  `update(updates, state, params=None, *, ref_grads=None, **extra)`;
  ref_grads=None is the identity. Place it after the penalty transforms and
  before clipping / the base optimizer, on raw (unscaled) gradients.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, ref_grads=None, **extra):
    del params, extra  # Other extra args belong to other transforms.
    if ref_grads is None:
      return updates, state
    return project(updates, ref_grads), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory_per_task = 64  # Episodic memory size kept per finished task.
  c.ref_batch = 16  # Memory examples per task for the reference gradient.
  return c


def _validate(cfg, names, config=None):
  del config
  base.check_fields('agem', cfg, {'memory_per_task': {'positive': True, 'integer': True},
                                  'ref_batch': {'positive': True, 'integer': True}})
  if 'tagem' in names:
    raise ValueError('strategy.names has both agem and tagem: TA-A-GEM is A-GEM with its own memory, pick one')


def _update_args(cfg, ctx, params, key):
  """The reference gradient on the memories (none before any task is stored: the identity)."""
  if not memory.available(ctx):
    return {}
  return {'ref_grads': jax.grad(lambda p: memory.memory_loss(ctx, p, key, cfg.ref_batch))(params)}


STRATEGY = base.Strategy(
    name='agem', config=default_config, validate=_validate,
    needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task),
    transform=lambda cfg, stage: agem(), update_args=_update_args)
