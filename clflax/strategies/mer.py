"""Meta-Experience Replay (Riemer et al. 2019), the Reptile form.

For each incoming example, MER builds s batches, each the current example
plus k - 1 replayed ones, and runs plain SGD one (mini-)batch at a time:
  for i in 1..s:                    theta_B <- theta
    for j in 1..k:                  theta <- theta - lr * grad L(theta, b_ij)
    theta <- theta_B + beta * (theta - theta_B)       (within-batch Reptile)
  theta <- theta_A + gamma * (theta - theta_A)         (across batches;
                                                         theta_A: the start)
Reptile's interpolation maximises the inner products of gradients between the
sequential steps, i.e. transfer and no interference between old and new
examples. `mer_step` runs both loops as nested `lax.scan`s: one compilation.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from clflax.strategies import base
from clflax.strategies import memory

PyTree = Any


def interpolate(start: PyTree, end: PyTree, rate) -> PyTree:
  """start + rate * (end - start), leaf by leaf (the Reptile meta-update)."""
  return jax.tree.map(lambda a, b: (a + rate * (b - a)).astype(a.dtype),
                      start, end)


def _steps(batches: PyTree):
  shapes = {tuple(jnp.shape(x)[:2]) for x in jax.tree.leaves(batches)}
  if not shapes:
    raise ValueError('batches has no array leaves')
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError('batches leaves must share leading axes [s, k] (batches, '
                     f'steps per batch), got {sorted(shapes)}')
  return shapes.pop()


def mer_step(params: PyTree, loss_fn: Callable[[PyTree, PyTree], jax.Array],
             batches: PyTree, inner_lr, beta, gamma) -> PyTree:
  """One MER update of params; returns the new params.

  Args:
    params: parameters theta.
    loss_fn: loss_fn(params, b) -> scalar for one inner step's data b.
    batches: pytree whose leaves have leading axes [s, k]: s batches of k
      SGD steps; b = batches[i][j] may itself be one example (the paper) or
      a mini-batch (leaves [s, k, m, ...]).
    inner_lr: SGD learning rate of the inner steps (alpha in the paper).
    beta: within-batch Reptile rate; gamma: across-batch Reptile rate.
      beta = gamma = 1 is plain SGD over the s * k steps.
  """
  for name, v in (('inner_lr', inner_lr), ('beta', beta), ('gamma', gamma)):
    if isinstance(v, (int, float)) and not v > 0:
      raise ValueError(f'mer: {name} must be > 0, got {v}')
  _steps(batches)
  grad_fn = jax.grad(loss_fn)

  def sgd(theta, b):
    g = grad_fn(theta, b)
    return jax.tree.map(lambda p, d: (p - inner_lr * d).astype(p.dtype),
                        theta, g), None

  def reptile_batch(theta, batch):
    end, _ = jax.lax.scan(sgd, theta, batch)
    return interpolate(theta, end, beta), None

  end, _ = jax.lax.scan(reptile_batch, params, batches)
  return interpolate(params, end, gamma)


def mer_batches(current: PyTree, memory: PyTree) -> PyTree:
  """Batches [s, k, ...] for `mer_step`: the current data first, then memory.

  Args:
    current: leaves [c, ...], the incoming example(s), repeated in every batch.
    memory: leaves [s, k - c, ...], replayed examples drawn for each batch
      (e.g. `memory.sample(buffer, key, s * (k - c))` reshaped).
  """
  if jax.tree.structure(current) != jax.tree.structure(memory):
    raise ValueError('current and memory must have the same structure: '
                     f'{jax.tree.structure(current)} vs '
                     f'{jax.tree.structure(memory)}')

  def join(c, m):
    c, m = jnp.asarray(c), jnp.asarray(m)
    if jnp.ndim(m) < 2 or jnp.shape(c)[1:] != jnp.shape(m)[2:]:
      raise ValueError(f'memory leaves must be [s, k - c, *example] and '
                       f'current [c, *example]; got {jnp.shape(m)} and '
                       f'{jnp.shape(c)}')
    c = jnp.broadcast_to(c, (m.shape[0],) + c.shape)
    return jnp.concatenate([c.astype(m.dtype), m], axis=1)
  return jax.tree.map(join, current, memory)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()  # The Reptile form; its own update.
  c.memory_per_task = 64  # Episodic memory kept per finished task.
  c.batches = 5  # s: Reptile batches per incoming batch.
  c.steps = 2  # k: SGD steps per Reptile batch: the incoming batch, then k - 1 memory batches of its size.
  c.beta = 0.1  # Within-batch Reptile rate (1 = plain SGD through the batch).
  c.gamma = 1.0  # Across-batch Reptile rate.
  return c


def _validate(cfg, names, config=None):
  positive = {'positive': True, 'integer': True}
  base.check_fields('mer', cfg, {'memory_per_task': positive, 'batches': positive, 'steps': positive,
                                 'beta': {'positive': True}, 'gamma': {'positive': True}})
  base.require_alone('mer', names, 'mer replaces the optimizer step')
  if config is not None:
    base.require_classic('mer', config, 's x k SGD steps per incoming batch')


def _replace_update(cfg, ctx, params, key):
  """MER's update of one incoming batch: s Reptile batches, each an SGD step on the batch then k - 1 steps on memory
  batches of its size (plain SGD at `train.learning_rate`; the optax chain is not used). While the memory is empty
  its batches weigh nothing (their steps are no-ops). The SHARED memory of the classic protocols is filled at the
  end of each stage (not by reservoir over the stream, as in the paper)."""
  sample_key, drop_key = jax.random.split(key)
  stored = ctx.memories[memory.SHARED]
  s, k, n = cfg.batches, cfg.steps, ctx.batch['valid'].shape[0]
  drawn = memory.sample(stored, sample_key, s * max(k - 1, 1) * n)
  drawn = dict(drawn, valid=jnp.logical_and(drawn['valid'], memory.size(stored) > 0))
  drawn = jax.tree.map(lambda x: x.reshape((s, max(k - 1, 1), n) + x.shape[1:])[:, :k - 1], drawn)
  batches = mer_batches(jax.tree.map(lambda x: x[None], ctx.batch), drawn)
  loss_fn = lambda p, b: ctx.loss(ctx.task, ctx.apply(p, b, ctx.task, drop_key), b)[0]  # noqa: E731 (one mask)
  loss = loss_fn(params, ctx.batch)
  params = mer_step(params, loss_fn, batches, ctx.config.train.learning_rate, cfg.beta, cfg.gamma)
  return params, {'ce': loss, 'total': loss}


STRATEGY = base.Strategy(name='mer', config=default_config, validate=_validate,
                         needs=lambda cfg: base.Needs(memory_per_task=cfg.memory_per_task),
                         replace_update=_replace_update)
