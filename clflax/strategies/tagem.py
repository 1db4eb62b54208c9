"""Clustering-based episodic memory of TA-A-GEM (Lamers et al. 2023).

Task-agnostic A-GEM needs a memory that stays representative without being
told when the task changes. The memory holds one pool per label (class),
each with at most Q clusters of at most P samples. Online, one sample per
training batch is offered to the pool of its label:
  * while the pool has fewer than Q clusters, the sample starts a new one;
  * otherwise it joins the cluster whose centroid (mean of its current
    members) is nearest in Euclidean distance;
  * a cluster holding P samples drops its OLDEST one to make room (FIFO).
This is the paper's clustering mechanism (its Algorithm 3): nearest mean,
oldest-out. FIFO within a cluster keeps each cluster a recent, local summary
while the cluster layout itself (created from the first Q samples of a label
and never deleted) keeps regions of input space that later data stops
visiting, i.e. old tasks. The reference gradient of A-GEM is then computed
on `sample`, drawn uniformly from ALL pools.

Clustering space: by default the example itself, flattened (the paper
clusters inputs); pass `feature=` (e.g. an embedding) with `feature_dim` set
at `init` to cluster elsewhere. Features are stored beside the examples so
centroids stay exact as members leave.

Fixed shapes throughout ([num_pools, Q, P, ...] slots), so `add`, `insert`
and `sample` jit-compile once.
"""
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clflax.strategies import agem
from clflax.strategies import base

PyTree = Any


class ClusterMemory(NamedTuple):
  data: PyTree          # Examples, each leaf [num_pools, Q, P, ...].
  features: jax.Array   # float32 [num_pools, Q, P, D]: clustering coordinates.
  written: jax.Array    # int32 [num_pools, Q]: samples ever put in each cluster.
  clusters: jax.Array   # int32 [num_pools]: clusters opened in each pool (<= Q).
  seen: jax.Array       # int32 scalar: samples offered (counted or not).


def _example_size(example: PyTree) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(example))


def init(num_pools: int, q: int, p: int, example: PyTree,
         feature_dim: Optional[int] = None) -> ClusterMemory:
  """Empty memory: num_pools pools x q clusters x p samples like `example`.

  `example` is one example without batch axis (arrays or ShapeDtypeStructs).
  feature_dim: length of the clustering feature (default: the example's
  total size, clustering on the flattened example).
  """
  for name, v in (('num_pools', num_pools), ('Q', q), ('P', p)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ValueError(f'{name} must be a positive int, got {v!r}')
  if not jax.tree.leaves(example):
    raise ValueError('example has no array leaves')
  dim = _example_size(example) if feature_dim is None else feature_dim
  if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
    raise ValueError(f'feature_dim must be a positive int, got {dim!r}')
  def zeros(x):  # Arrays, scalars or jax.ShapeDtypeStruct.
    dtype = x.dtype if hasattr(x, 'dtype') else jnp.asarray(x).dtype
    return jnp.zeros((num_pools, q, p) + tuple(jnp.shape(x)), dtype)
  return ClusterMemory(
      data=jax.tree.map(zeros, example),
      features=jnp.zeros((num_pools, q, p, dim), jnp.float32),
      written=jnp.zeros((num_pools, q), jnp.int32),
      clusters=jnp.zeros((num_pools,), jnp.int32),
      seen=jnp.zeros((), jnp.int32))


def _shape(memory: ClusterMemory):
  return memory.written.shape + (memory.features.shape[2],)  # (pools, Q, P).


def _flatten(example: PyTree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                          for x in jax.tree.leaves(example)])


def _check_example(memory: ClusterMemory, example: PyTree, batched: bool):
  if jax.tree.structure(memory.data) != jax.tree.structure(example):
    raise ValueError('example structure does not match the memory: '
                     f'{jax.tree.structure(example)} vs '
                     f'{jax.tree.structure(memory.data)}')
  skip = 1 if batched else 0
  for d, x in zip(jax.tree.leaves(memory.data), jax.tree.leaves(example)):
    if d.shape[3:] != jnp.shape(x)[skip:]:
      raise ValueError(f'example shape {jnp.shape(x)[skip:]} does not match '
                       f'the memory example shape {d.shape[3:]}')


def _check_feature(memory: ClusterMemory, feature: jax.Array, lead=()):
  want = lead + (memory.features.shape[-1],)
  if jnp.shape(feature) != want:
    raise ValueError(f'feature must have shape {want}, got {jnp.shape(feature)}')


def _means(features: jax.Array, written: jax.Array) -> jax.Array:
  """Mean of each cluster's current members: [..., Q, P, D] -> [..., Q, D]."""
  p = features.shape[-2]
  count = jnp.minimum(written, p)
  member = jnp.arange(p) < count[..., None]
  total = jnp.sum(jnp.where(member[..., None], features, 0.0), axis=-2)
  return total / jnp.maximum(count, 1)[..., None].astype(jnp.float32)


def centroids(memory: ClusterMemory) -> jax.Array:
  """[num_pools, Q, D] mean feature of each cluster's current members."""
  return _means(memory.features, memory.written)


def insert(memory: ClusterMemory, example: PyTree, label: jax.Array,
           feature: Optional[jax.Array] = None) -> ClusterMemory:
  """Offers one example (no batch axis) to the pool `label`.

  Labels outside [0, num_pools) are skipped (only `seen` counts them).
  `feature` [D] is the clustering coordinate (default: flattened example).
  """
  _check_example(memory, example, batched=False)
  num_pools, q, p = _shape(memory)
  feature = _flatten(example) if feature is None else jnp.asarray(
      feature, jnp.float32)
  _check_feature(memory, feature)
  label = jnp.asarray(label, jnp.int32)
  ok = (label >= 0) & (label < num_pools)
  pool = jnp.clip(label, 0, num_pools - 1)

  opened = memory.clusters[pool]
  means = _means(memory.features[pool], memory.written[pool])  # This pool only.
  dist = jnp.sum(jnp.square(means - feature), axis=-1)
  dist = jnp.where(jnp.arange(q) < opened, dist, jnp.inf)
  new = opened < q
  cluster = jnp.where(new, opened, jnp.argmin(dist))
  slot = memory.written[pool, cluster] % p  # Oldest member once full (FIFO).
  pool = jnp.where(ok, pool, num_pools)     # Out of range: the scatter drops.

  def write(d, x):
    return d.at[pool, cluster, slot].set(jnp.asarray(x).astype(d.dtype),
                                         mode='drop')
  return ClusterMemory(
      data=jax.tree.map(write, memory.data, example),
      features=write(memory.features, feature),
      written=memory.written.at[pool, cluster].add(1, mode='drop'),
      clusters=memory.clusters.at[pool].add(new.astype(jnp.int32),
                                            mode='drop'),
      seen=memory.seen + 1)


def add(memory: ClusterMemory, batch: PyTree, labels: jax.Array,
        key: jax.Array, *, features: Optional[jax.Array] = None,
        valid: Optional[jax.Array] = None) -> ClusterMemory:
  """TA-A-GEM's online update: ONE example of the batch, picked by `key`.

  Args:
    batch: examples with a leading batch axis B.
    labels: [B] int pool of each example (its class).
    key: PRNG key choosing the example uniformly among the valid ones.
    features: optional [B, D] clustering coordinates.
    valid: optional [B] bool (padding = False); no valid example = no-op.
  """
  _check_example(memory, batch, batched=True)
  labels = jnp.asarray(labels)
  b = labels.shape[0] if labels.ndim == 1 else None
  if b is None or any(jnp.shape(x)[0] != b for x in jax.tree.leaves(batch)):
    raise ValueError('labels must be [B] and every batch leaf must have a '
                     f'leading axis B; got labels {labels.shape}')
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (b,):
    raise ValueError(f'valid must have shape ({b},), got {valid.shape}')
  if features is not None:
    _check_feature(memory, jnp.asarray(features), (b,))
  i = jax.random.categorical(key, jnp.where(valid, 0.0, -jnp.inf))
  example = jax.tree.map(lambda x: x[i], batch)
  feature = None if features is None else jnp.asarray(features)[i]
  # An invalid pick (no valid example at all) goes to pool -1: skipped.
  label = jnp.where(valid[i], labels[i], -1)
  return insert(memory, example, label, feature)


def valid_slots(memory: ClusterMemory) -> jax.Array:
  """[num_pools * Q * P] bool: which slots hold a stored example."""
  _, _, p = _shape(memory)
  count = jnp.minimum(memory.written, p)
  return (jnp.arange(p)[None, None, :] < count[..., None]).reshape(-1)


def size(memory: ClusterMemory) -> jax.Array:
  """Total number of stored examples (int32 scalar)."""
  return jnp.sum(valid_slots(memory).astype(jnp.int32))


def sample(memory: ClusterMemory, key: jax.Array, n: int) -> PyTree:
  """n stored examples, uniformly over all pools (without replacement when
  n <= size, with replacement otherwise); returns (batch, pools).

  `pools` [n] is each example's pool (its label). An empty memory returns
  the init zeros with pool 0: weight the A-GEM reference by size(memory) > 0.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
    raise ValueError(f'n must be a positive int, got {n!r}')
  num_pools, q, p = _shape(memory)
  slots = num_pools * q * p
  valid = valid_slots(memory)
  k_without, k_with = jax.random.split(key)
  scores = jnp.where(valid, jax.random.uniform(k_without, (slots,)), -1.0)
  _, without = jax.lax.top_k(scores, min(n, slots))
  if n > slots:
    without = jnp.concatenate([without, jnp.zeros((n - slots,), jnp.int32)])
  total = jnp.sum(valid.astype(jnp.int32))
  # Uniform over the valid slots by index (not jax.random.categorical: n x slots Gumbel draws every step).
  filled = jnp.flatnonzero(valid, size=slots, fill_value=0)
  with_ = filled[jax.random.randint(k_with, (n,), 0, jnp.maximum(total, 1))]
  idx = jnp.where(n <= total, without, with_)
  idx = jnp.where(total > 0, idx, 0)
  flat = jax.tree.map(lambda d: d.reshape((slots,) + d.shape[3:]), memory.data)
  return jax.tree.map(lambda d: d[idx], flat), idx // (q * p)


def _computed(tree: PyTree) -> jax.Array:
  """Always True, but computed from `tree`, so whatever depends on it runs after `tree` (XLA cannot fold it: x * 0
  is not 0 for an inf or NaN x, and it does not see that the `where` rules those out).

  The insertion into the memory and the sample drawn from it for the reference gradient touch the same buffers; XLA
  writes them in place only if the write comes after the reads in the data flow (on CPU an optimization barrier is
  dropped before copy insertion), otherwise it copies the whole memory, twice per scanned step (4,250 x 784 images
  on Permuted MNIST). ANDed into the insertion's `valid`, this flag makes it wait for the reference gradient.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.size(x)]
  if not leaves:
    return jnp.asarray(True)
  x = jnp.ravel(leaves[0])[0].astype(jnp.float32)
  return jnp.where(jnp.isfinite(x), x, 0.0) * 0.0 == 0.0


class TagemState(NamedTuple):
  """TA-A-GEM's memory, kept in the optax state: it changes every step, and task boundaries are never needed."""
  memory: ClusterMemory


def tagem(num_pools: int, q: int, p: int, example: PyTree) -> optax.GradientTransformationExtraArgs:
  """TA-A-GEM as one optax transform: A-GEM's projection against `ref_grads` (the trainer computes them on
  `sample(state.memory, ...)`), then ONE example of `memory_batch=(batch, labels, key, valid)` joins the memory.

  `example` is one example without batch axis (its structure and dtypes shape the memory). Either extra argument
  may be None (no projection / no insertion). Sits where A-GEM sits in the chain.
  """
  def init_fn(params):
    del params
    return TagemState(init(num_pools, q, p, example))

  def update_fn(updates, state, params=None, *, ref_grads=None, memory_batch=None, **extra):
    del params, extra
    ready = True
    if ref_grads is not None:
      updates = agem.project(updates, ref_grads)
      ready = _computed(ref_grads)
    if memory_batch is not None:
      batch, labels, key, valid = memory_batch
      valid = jnp.ones(jnp.shape(labels)[:1], bool) if valid is None else valid
      state = TagemState(add(state.memory, batch, labels, key, valid=jnp.logical_and(valid, ready)))
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()  # One class label per example.
  c.pools = 10  # One pool per class label (labels outside [0, pools) are never stored).
  c.clusters = 4  # Q: clusters per pool.
  c.per_cluster = 4  # P: samples per cluster (the oldest leaves first).
  c.ref_batch = 16  # Memory examples (from all pools) for the reference gradient.
  return c


def _validate(cfg, names, config=None):
  positive = {'positive': True, 'integer': True}
  base.check_fields('tagem', cfg, {'pools': positive, 'clusters': positive, 'per_cluster': positive,
                                   'ref_batch': positive})
  if config is not None:
    base.require_classic('tagem', config, 'it pools examples by their class label')


def _transform(cfg, stage):
  if stage.example is None:
    raise ValueError('tagem needs Stage.example (one training example) to shape its memory')
  return tagem(cfg.pools, cfg.clusters, cfg.per_cluster, stage.example)


def _update_args(cfg, ctx, params, key):
  """The reference gradient on the clustering memory (all pools, the current task's included; zero while empty)
  and this step's offer to the memory."""
  stored = base.find_state(ctx.opt_state, TagemState).memory
  sample_key, drop_key, offer_key = jax.random.split(key, 3)
  ref_batch, _ = sample(stored, sample_key, cfg.ref_batch)
  ref_batch = dict(ref_batch, valid=jnp.ones((cfg.ref_batch,), bool))
  ref_loss = lambda p: ctx.loss(ctx.task, ctx.apply(p, ref_batch, ctx.task, drop_key), ref_batch)[0]  # noqa: E731
  filled = size(stored) > 0
  ref_grads = jax.tree.map(lambda g: jnp.where(filled, g, 0.0), jax.grad(ref_loss)(params))
  offer = {k: v for k, v in ctx.batch.items() if k != 'valid'}
  return {'ref_grads': ref_grads, 'memory_batch': (offer, ctx.batch['label'], offer_key, ctx.batch['valid'])}


STRATEGY = base.Strategy(name='tagem', config=default_config, validate=_validate, transform=_transform,
                         update_args=_update_args)
