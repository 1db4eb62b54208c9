"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017).

One constraint per previous task k: the update g~ must not increase task k's
memory loss to first order, <g~, g_k> >= 0. GEM projects g onto that cone,
  min_z 0.5 ||z - g||^2  s.t.  G z >= 0   (rows of G: the task gradients),
through its dual, a QP in T variables (T = number of previous tasks):
  min_v 0.5 v' G G' v + g' G' v  s.t.  v >= 0,   then  z = g + G' v.
T is small, so `solve_dual` is an exact active-set (Lawson-Hanson style)
method on the T x T Gram matrix, in `lax.while_loop`s: jittable, no QP library.

Shapes are static: `task_grads` has a leading axis T_max on every leaf and a
[T_max] `valid` flag marks the tasks seen so far, so one compilation serves
every stage. As for A-GEM, inner products run over ALL leaves as one vector.

Margin: the paper's "small constant gamma >= 0 added to v*" (in the authors'
code the dual bound v >= margin), applied only when some constraint is
violated, as in their code; margin=0 is the exact Euclidean projection.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import base
from clflax.strategies import memory

PyTree = Any


def _check_qp(gram: jax.Array, linear: jax.Array, valid: Optional[jax.Array]):
  t = linear.shape[0] if linear.ndim == 1 else None
  if t is None or gram.shape != (t, t):
    raise ValueError(f'gram must be [T, T] and linear [T], got {gram.shape} '
                     f'and {linear.shape}')
  if valid is not None and jnp.shape(valid) != (t,):
    raise ValueError(f'valid must have shape ({t},), got {jnp.shape(valid)}')


def solve_dual(gram: jax.Array, linear: jax.Array,
               valid: Optional[jax.Array] = None, *,
               max_iter: Optional[int] = None) -> jax.Array:
  """argmin_v 0.5 v'Pv + c'v s.t. v >= 0 (v = 0 where not valid); exact.

  Args:
    gram: [T, T] symmetric positive definite P (add a ridge if singular).
    linear: [T] c.
    valid: optional [T] bool; invalid coordinates are fixed at 0.
    max_iter: bound on active-set changes (default 3 T; each one is a T x T
      solve). The method is finite; the bound only guards degenerate cycling.

  Primal active-set method (Lawson & Hanson's NNLS generalised to a PD
  Hessian): grow the free set by the coordinate with the most negative
  gradient, solve the equality-constrained problem on the free set, and step
  back to the boundary whenever that solution leaves v >= 0.
  """
  _check_qp(gram, linear, valid)
  t = linear.shape[0]
  dtype = jnp.promote_types(gram.dtype, jnp.float32)
  p = 0.5 * (gram + gram.T).astype(dtype)
  c = linear.astype(dtype)
  valid = jnp.ones((t,), bool) if valid is None else jnp.asarray(valid, bool)
  max_iter = 3 * t if max_iter is None else max_iter
  # Optimality tolerance on the gradient, relative to the problem's scale.
  tol = 1e-6 * (jnp.max(jnp.abs(c)) + jnp.max(jnp.abs(p)))
  eye = jnp.eye(t, dtype=dtype)

  def solve_on(free):  # Minimiser with v = 0 outside `free`.
    a = jnp.where(free[:, None] & free[None, :], p, eye)
    return jnp.where(free, jnp.linalg.solve(a, jnp.where(free, -c, 0.0)), 0.0)

  def neg_grad(v):
    return -(p @ v + c)

  def outer_cond(state):
    v, free, it = state
    w = neg_grad(v)
    return jnp.any(valid & ~free & (w > tol)) & (it < max_iter)

  def outer_body(state):
    v, free, it = state
    w = jnp.where(valid & ~free, neg_grad(v), -jnp.inf)
    free = free.at[jnp.argmax(w)].set(True)

    def inner_cond(inner):
      _, free, s, k = inner
      return jnp.any(free & (s <= 0)) & (k < t)

    def inner_body(inner):
      v, free, s, k = inner
      blocking = free & (s <= 0)
      gap = v - s  # >= 0 where blocking; 0 only if v_i = s_i = 0.
      ratio = jnp.where(blocking,
                        jnp.where(gap > 0, v / jnp.where(gap > 0, gap, 1.0), 0.0),
                        jnp.inf)
      alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
      v = v + alpha * (s - v)
      free = free & (v > 0) & ~(blocking & (ratio <= alpha))
      v = jnp.where(free, v, 0.0)
      return v, free, solve_on(free), k + 1

    s = solve_on(free)
    v, free, s, _ = jax.lax.while_loop(inner_cond, inner_body, (v, free, s, 0))
    return jnp.maximum(s, 0.0), free, it + 1

  v0 = jnp.zeros((t,), dtype)
  v, _, _ = jax.lax.while_loop(outer_cond, outer_body,
                               (v0, jnp.zeros((t,), bool), 0))
  return v


def _flat_gram(task_grads: PyTree) -> jax.Array:
  """G G' [T, T] over all leaves, in float32."""
  def gram(a):
    a = a.reshape(a.shape[0], -1).astype(jnp.float32)
    return a @ a.T
  grams = jax.tree.leaves(jax.tree.map(gram, task_grads))
  return sum(grams[1:], grams[0])


def _flat_dots(task_grads: PyTree, grads: PyTree) -> jax.Array:
  """G g [T] over all leaves, in float32."""
  def dots(a, g):
    return a.reshape(a.shape[0], -1).astype(jnp.float32) @ jnp.ravel(
        g).astype(jnp.float32)
  linear = jax.tree.leaves(jax.tree.map(dots, task_grads, grads))
  return sum(linear[1:], linear[0])


def _task_count(grads: PyTree, task_grads: PyTree) -> int:
  if jax.tree.structure(grads) != jax.tree.structure(task_grads):
    raise ValueError('task_grads must have the same tree structure as grads: '
                     f'{jax.tree.structure(task_grads)} vs '
                     f'{jax.tree.structure(grads)}')
  counts = set()
  for g, tg in zip(jax.tree.leaves(grads), jax.tree.leaves(task_grads)):
    if jnp.shape(tg)[1:] != jnp.shape(g) or jnp.ndim(tg) == 0:
      raise ValueError(f'task_grads leaves must be [T, *grad.shape], got '
                       f'{jnp.shape(tg)} for a gradient of shape {jnp.shape(g)}')
    counts.add(jnp.shape(tg)[0])
  if len(counts) != 1:
    raise ValueError(f'task_grads leaves disagree on T: {sorted(counts)}')
  return counts.pop()


def project(grads: PyTree, task_grads: PyTree, margin: float = 0.0,
            valid: Optional[jax.Array] = None, *,
            ridge: float = 1e-6) -> PyTree:
  """GEM projection of grads against one gradient per previous task.

  Args:
    grads: the current task's gradient g (any pytree).
    task_grads: same structure, each leaf with a leading axis T (g_k, one per
      previous task).
    margin: gamma >= 0, the lower bound on the dual variables when some
      constraint <g, g_k> < 0 is violated (0 = exact projection).
    valid: optional [T] bool, the previous tasks that exist (others ignored).
    ridge: added to the Gram diagonal, relative to its largest entry, so that
      linearly dependent task gradients keep the dual solvable.

  Returns grads unchanged when no valid constraint is violated.
  """
  t = _task_count(grads, task_grads)
  if isinstance(margin, (int, float)) and not margin >= 0:
    raise ValueError(f'gem: margin must be >= 0, got {margin}')
  valid = jnp.ones((t,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (t,):
    raise ValueError(f'valid must have shape ({t},), got {valid.shape}')
  # z = g + G'v only depends on G'v: rescale G by its largest entry so that
  # the Gram matrix cannot underflow for tiny gradients (v scales inversely).
  # Rows of invalid tasks are zeroed (they may hold stale or garbage values).
  def rows(x):
    return jnp.where(valid.reshape((t,) + (1,) * (x.ndim - 1)),
                     x.astype(jnp.float32), 0.0)
  masked = jax.tree.map(rows, task_grads)
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(x))
                           for x in jax.tree.leaves(masked)]))
  top = jnp.where(top > 0, top, 1.0)
  scaled = jax.tree.map(lambda x: x / top, masked)
  dots = _flat_dots(scaled, grads)

  def projected():
    gram = _flat_gram(scaled)
    gram = gram + ridge * jnp.max(jnp.diag(gram)) * jnp.eye(t)
    # v = u + margin on valid tasks, u >= 0: the same QP with a shifted c.
    lower = jnp.where(valid, margin * top, 0.0)
    u = solve_dual(gram, dots + gram @ lower, valid)
    v = jnp.where(valid, u + lower, 0.0)
    return jax.tree.map(
        lambda g, x: (g + jnp.tensordot(v, x, axes=1)).astype(g.dtype),
        grads, scaled)

  # The T x T Gram matrix and the QP only when some constraint is violated
  # (the Gram's T^2 N products dominate the step otherwise).
  violated = jnp.any(valid & (dots < 0))
  return jax.lax.cond(violated, projected, lambda: grads)


def gem(margin: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Transform projecting the updates with the `task_grads` extra arg.

  `update(updates, state, params=None, *, task_grads=None, task_valid=None,
  **extra)`; task_grads=None is the identity. Like `agem`, place it after the
  penalty transforms and before clipping / the base optimizer.
  """
  if isinstance(margin, (int, float)) and not margin >= 0:
    raise ValueError(f'gem: margin must be >= 0, got {margin}')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, task_grads=None,
                task_valid=None, **extra):
    del params, extra  # Other extra args belong to other transforms.
    if task_grads is None:
      return updates, state
    return project(updates, task_grads, margin, task_valid), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory_per_task = 64  # Episodic memory size kept per finished task.
  c.ref_batch_per_task = 16  # Memory examples of EACH earlier task for its gradient, every step.
  c.margin = 0.5  # gamma: dual lower bound when a constraint is violated (GEM authors' MNIST value; 0 = exact).
  return c


def task_gradients(cfg, ctx, params, key):
  """GEM's constraints: (each earlier task's memory-loss gradient stacked on a leading task axis, [T] valid).

  Per-task memories (vision): one gradient per earlier task through its own head (T = len(earlier), fixed within
  the stage's compiled step). SHARED memory (classic): T = the run's number of tasks, block k task k's memory, all
  by one `lax.map` whatever the stage (one compilation); a block not yet filled skips its gradient (`lax.cond`).
  """
  def grad_on(batch, head, drop_key):
    return jax.grad(lambda p: ctx.loss(head, ctx.apply(p, batch, head, drop_key), batch)[0])(params)

  if memory.SHARED in ctx.memories:
    blocks, filled = memory.task_blocks(ctx.memories[memory.SHARED], len(ctx.config.tasks))
    rows = min(cfg.memory_per_task, jax.tree.leaves(blocks)[0].shape[1])  # GEM's share if others keep more.
    n = min(cfg.ref_batch_per_task, rows)

    def one(inputs):
      block, ok, task_key = inputs
      pick_key, drop_key = jax.random.split(task_key)
      block = jax.tree.map(lambda d: d[:rows], block)
      if n < rows:  # Without replacement: the n rows with the largest uniform scores.
        _, pick = jax.lax.top_k(jax.random.uniform(pick_key, (rows,)), n)
        block = jax.tree.map(lambda d: d[pick], block)
      return jax.lax.cond(ok, lambda: grad_on(block, ctx.task, drop_key),
                          lambda: jax.tree.map(jnp.zeros_like, params))

    return jax.lax.map(one, (blocks, filled, jax.random.split(key, filled.shape[0]))), filled
  grads, valid = [], []
  for head, head_key in zip(ctx.earlier, jax.random.split(key, len(ctx.earlier))):
    sample_key, drop_key = jax.random.split(head_key)
    stored = ctx.memories[head]
    grads.append(grad_on(memory.sample(stored, sample_key, cfg.ref_batch_per_task), head, drop_key))
    valid.append(memory.size(stored) > 0)
  return jax.tree.map(lambda *g: jnp.stack(g), *grads), jnp.stack(valid)


def _update_args(cfg, ctx, params, key):
  if not memory.available(ctx):
    return {}
  task_grads, task_valid = task_gradients(cfg, ctx, params, key)
  return {'task_grads': task_grads, 'task_valid': task_valid}


STRATEGY = base.Strategy(
    name='gem', config=default_config,
    validate=lambda cfg, names, config=None: base.check_fields(
        'gem', cfg, {'memory_per_task': {'positive': True, 'integer': True},
                     'ref_batch_per_task': {'positive': True, 'integer': True}, 'margin': {}}),
    needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task),
    transform=lambda cfg, stage: gem(cfg.margin), update_args=_update_args)
