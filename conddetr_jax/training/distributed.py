"""Multi-host start-up: ``jax.distributed.initialize`` when flags or the environment ask for it.

The coordination service (run by process 0) declares a process dead once it has sent no
heartbeat for ``heartbeat_timeout_s``; JAX then terminates every other process. Longer means
fewer false alarms (a host stalled or cut off for a while), shorter means a lost host idles the
others for less time. A false alarm costs a restart and the steps since the last checkpoint, a
late detection only idle time, so the default errs long (JAX's own 100 s). ``shutdown_timeout_s``
bounds how long a process that has finished (or failed on its own) waits at exit for the others
to finish too: processes finish the same final save and evaluation within seconds of each other,
so 120 s is ample and keeps a single failing host from holding the job for JAX's 5 minutes.
"""

import os

from absl import flags, logging
import jax
import orbax.checkpoint as ocp


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
  return (
    _env_int("SLURM_NTASKS") > 1
    or _env_int("OMPI_COMM_WORLD_SIZE") > 1
    or len(tpu_hosts) > 1
    or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
  )


HEARTBEAT_TIMEOUT_S = 100
SHUTDOWN_TIMEOUT_S = 120
_ORBAX_DISTRIBUTED_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def _orbax_barriers_through_the_coordination_service() -> None:
  """Makes Orbax wait for the other processes the way ``wait_for_all_processes`` does.

  By default Orbax's barriers (on creating a checkpoint manager, around each save) are device
  collectives, one device per process: on CPU a gloo collective fails when its processes arrive
  more than 30 s apart, which set-up work on a loaded host exceeds. Its flag routes them through
  JAX's coordination service instead (5 minute timeout). Set only when absl has parsed the flags
  (train.py and eval.py do); an Orbax without the flag keeps its own barriers.
  """
  if _ORBAX_DISTRIBUTED_BARRIER_FLAG in flags.FLAGS and flags.FLAGS.is_parsed():
    flags.FLAGS[_ORBAX_DISTRIBUTED_BARRIER_FLAG].value = True


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
  shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> bool:
  """Joins the multi-process job if asked to; must run before anything touches a JAX device.

  Args:
    coordinator_address: ``host:port`` of process 0 (GPU clusters without SLURM).
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    heartbeat_timeout_s: seconds without a heartbeat after which a process counts as lost.
    shutdown_timeout_s: seconds a process waits at exit for the others to exit too.

  Returns:
    True if ``jax.distributed.initialize`` was called. Any explicit argument forces it (with the
    others auto-detected where JAX can); otherwise it runs only when ``wants_distributed()``.
  """
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if not explicit and not wants_distributed():
    return False
  for name, seconds in (
    ("heartbeat_timeout_s", heartbeat_timeout_s),
    ("shutdown_timeout_s", shutdown_timeout_s),
  ):
    if seconds < 1:
      raise ValueError(f"{name}={seconds}: must be >= 1 second")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
    shutdown_timeout_seconds=shutdown_timeout_s,
  )
  _orbax_barriers_through_the_coordination_service()
  logging.info(
    "process %d of %d, %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def define_flags() -> None:
  """Defines the multi-host flags of train.py and eval.py (needed only where no SLURM, MPI or TPU
  VM environment describes the job): ``--coordinator_address``, ``--num_processes``,
  ``--process_id``, ``--heartbeat_timeout_s`` and ``--shutdown_timeout_s``."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0, for jax.distributed.initialize.",
  )
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
  flags.DEFINE_integer(
    "heartbeat_timeout_s",
    HEARTBEAT_TIMEOUT_S,
    "Multi-host: seconds without a heartbeat after which a process counts as lost and the others "
    "stop (shorter: a lost host idles the others less; longer: fewer false alarms from stalled "
    "hosts).",
  )
  flags.DEFINE_integer(
    "shutdown_timeout_s",
    SHUTDOWN_TIMEOUT_S,
    "Multi-host: seconds a process that has finished or failed waits at exit for the others.",
  )


def initialize_from_flags() -> bool:
  """``maybe_initialize`` with the values of the flags ``define_flags`` defined."""
  f = flags.FLAGS
  return maybe_initialize(
    f.coordinator_address,
    f.num_processes,
    f.process_id,
    heartbeat_timeout_s=f.heartbeat_timeout_s,
    shutdown_timeout_s=f.shutdown_timeout_s,
  )


def wait_for_all_processes(name: str) -> None:
  """Blocks until every process has called this with ``name``; a no-op on one process.

  Goes through the coordination service, not a device collective: on CPU, a gloo collective
  whose processes arrive more than 30 s apart fails ("Gloo context initialization failed"),
  and set-up work (dataset checks, compilation, restoring) can skew processes by that much on a
  busy machine. ``name`` must be new for each call.
  """
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, processes=set(range(jax.process_count())))
