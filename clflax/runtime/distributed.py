"""Multi-process runs: joining JAX's distributed runtime before anything touches a device."""
import jax
import ml_collections


def maybe_initialize(config: ml_collections.ConfigDict) -> None:
  """Joins a multi-process JAX job when `config.distributed.enabled`; arguments left unset are discovered from the
  environment (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  dist = config.distributed
  if not dist.enabled:
    return
  kwargs = {}
  if dist.coordinator_address:
    kwargs['coordinator_address'] = dist.coordinator_address
  if dist.num_processes > 0:
    kwargs['num_processes'] = dist.num_processes
  if dist.process_id >= 0:
    kwargs['process_id'] = dist.process_id
  jax.distributed.initialize(**kwargs)
