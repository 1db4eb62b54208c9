"""Data parallelism with jax.sharding: one mesh axis 'data' over every device of every process.

Batches are split along their leading axis across the mesh; the train state, memories and teacher are replicated.
The jitted step is written for one device; XLA's SPMD partitioner inserts the gradient all-reduce. With several
processes (`config.distributed.enabled`), each host loads its own slice of each global training batch
(`shard_batch`); evaluation batches are read whole by every process (`shard_whole_batch`) and the eval step's
outputs come back replicated.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
  """One 'data' axis over every device of every process, in the order `jax.make_mesh` picks for the topology. The
  axis is `Auto` (jax.make_mesh's default is `Explicit`): the step is written for one device and XLA's partitioner
  places the gradient all-reduce."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


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


def shard_whole_batch(mesh: Mesh, whole_batch: dict):
  """Global arrays split over the mesh from a batch that every process holds in full (evaluation batches)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
                      whole_batch)


@jax.jit
def copy_tree(tree):
  """New buffers for every leaf of `tree` (so a donated step cannot delete them), in one compiled call rather
  than one per leaf shape."""
  return jax.tree.map(jnp.copy, tree)
