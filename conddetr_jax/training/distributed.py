"""Multi-host start-up: ``jax.distributed.initialize`` when flags or the environment ask for it."""

import os

import jax
from absl import logging


def _env_int(name: str) -> int:
  """An integer environment variable, 0 when unset or not a number."""
  try:
    return int(os.environ.get(name, "0"))
  except ValueError:
    return 0


def wants_distributed() -> bool:
  """Whether the environment describes a job of several processes that JAX can join by itself.

  SLURM (``srun`` with more than one task), Open MPI (``mpirun -n N``), a multi-host Cloud TPU VM
  (several ``TPU_WORKER_HOSTNAMES``) or an explicit ``JAX_COORDINATOR_ADDRESS``.
  """
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  return (_env_int("SLURM_NTASKS") > 1 or _env_int("OMPI_COMM_WORLD_SIZE") > 1 or len(tpu_hosts) > 1
          or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
  """Joins the multi-process job if asked to; must run before anything touches a JAX device.

  Args:
    coordinator_address: ``host:port`` of process 0 (GPU clusters without SLURM).
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).

  Returns:
    True if ``jax.distributed.initialize`` was called. Any explicit argument forces it (with the
    others auto-detected where JAX can); otherwise it runs only when ``wants_distributed()``.
  """
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if not explicit and not wants_distributed():
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
