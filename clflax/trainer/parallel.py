"""Data parallelism with jax.sharding: one mesh axis 'data' over every device of every process.

Batches are split along their leading axis across the mesh; the train state, memories and teacher are replicated.
The jitted step is written for one device; XLA's SPMD partitioner inserts the gradient all-reduce. With several
processes (`config.distributed.enabled`), each host loads its own slice of the global batch.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicate(mesh: Mesh, tree):
  """Places every leaf of `tree` on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(mesh: Mesh, local_batch: dict):
  """Global arrays from this process's slice of the batch (the whole batch with one process)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


@jax.jit
def copy_tree(tree):
  """New buffers for every leaf of `tree` (so a donated step cannot delete them), in one compiled call rather
  than one per leaf shape."""
  return jax.tree.map(jnp.copy, tree)
