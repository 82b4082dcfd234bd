"""What the other processes of a multi-host run say when one host is lost, instead of a crash dump.

When a process dies without a goodbye (a host lost, SIGKILL, out of memory), JAX's coordination
service notices: at once if it was process 0, which runs the service; otherwise once the process
has sent no heartbeat for the heartbeat timeout. JAX's client then aborts every other process
from one of its C++ threads (SIGABRT), after a fatal log line saying why ("The following tasks
are unhealthy (stopped sending heartbeats): 1", or "the leader task was preempted/died"). With
Python's faulthandler on (absl turns it on) that abort also prints every thread's stack and every
loaded extension module: a page of noise and no word on what to do.

jaxlib 0.10.2 accepts a Python ``missed_heartbeat_callback`` but cannot convert the status it
passes (the process dies of ``std::bad_cast``), so ``report_lost_host`` catches the abort itself:
a SIGABRT handler installed through libc prints a short message (which process is gone as far as
can be told, the last complete checkpoint, "rerun the same command on every host") and exits
with ``EXIT_CODE``. A collective can also fail first, in the main thread ("Gloo all-reduce
failed: Connection closed by peer"): that error waits for JAX's verdict before it is raised.
"""

import contextlib
import ctypes
import os
import signal
import socket
import threading
import time
from typing import Iterator

from absl import logging
import jax
import orbax.checkpoint as ocp

# sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run itself is
# fine, one of its hosts is gone.
EXIT_CODE = 75
_PROBE_TIMEOUT_S = 3.0
# After the heartbeat timeout, JAX's coordination service still has to notice and tell the others.
_VERDICT_GRACE_S = 15.0


def lost_host_message(
  process_index: int,
  process_count: int,
  coordinator_address: str | None,
  coordinator_reachable: bool,
  checkpoint_dir: str,
  checkpoint_step: int | None,
) -> str:
  """The message a surviving process prints when JAX's distributed runtime aborts it.

  Args:
    process_index: this process's index.
    process_count: the number of processes of the run.
    coordinator_address: ``host:port`` of the coordination service (process 0), if known.
    coordinator_reachable: whether that address still accepts connections; if not, process 0 is
      the lost one. If it does, the service itself most likely reported another process lost, and
      JAX's fatal line just above the message lists it.
    checkpoint_dir: the run's checkpoint directory.
    checkpoint_step: the newest complete checkpoint's step, None if there is none.

  Returns:
    A few lines of text, ending in a newline.
  """
  if coordinator_reachable:
    # Any abort lands here, not only JAX's; its fatal line above tells them apart.
    lost = (
      "JAX's distributed runtime stopped it (its fatal line above says why), most often because "
      "another process of the run was lost: that line lists the 'unhealthy' ones by index"
    )
  else:
    lost = (
      "process 0 was lost: the coordination service it "
      f"runs{f' at {coordinator_address}' if coordinator_address else ''} no longer answers"
    )
  resume = (
    f"the last complete checkpoint is step {checkpoint_step} in {checkpoint_dir}"
    if checkpoint_step is not None
    else f"there is no complete checkpoint yet in {checkpoint_dir} (a rerun starts from step 0)"
  )
  return (
    f"\nLOST HOST: process {process_index} of {process_count} is stopping: {lost}.\n"
    f"Nothing is lost but the steps after the last checkpoint: {resume}.\n"
    f"Rerun the same command on every host to resume. (exit code {EXIT_CODE})\n"
  )


def _accepts_connections(address: str | None) -> bool:
  """Whether ``host:port`` accepts a TCP connection within a few seconds (False if unknown)."""
  if not address:
    return False
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S):
      return True
  except (OSError, ValueError):
    return False


def _last_complete_step(checkpoint_dir: str) -> int | None:
  """The newest finalized checkpoint on disk (unfinished temporary directories do not count)."""
  try:
    steps = ocp.utils.checkpoint_steps(checkpoint_dir)
  except (OSError, ValueError):
    return None
  return max(steps, default=None)


def _coordinator_address() -> str | None:
  """Where process 0's coordination service listens, as ``jax.distributed.initialize`` was told."""
  try:  # JAX keeps it nowhere public: without it the message just cannot name the address
    from jax._src import distributed
  except ImportError:
    return None
  return getattr(distributed.global_state, "coordinator_address", None)


_SIGNAL_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


@contextlib.contextmanager
def report_lost_host(checkpoint_dir: str, heartbeat_timeout_s: float) -> Iterator[None]:
  """While inside, a JAX abort of this process (a lost peer) prints ``lost_host_message`` and exits.

  Does nothing in a single-process run or off the main thread. A ``JaxRuntimeError`` (a failed
  collective) is held for up to the heartbeat timeout first, so that a lost peer is reported as
  such; it is raised if JAX does not abort meanwhile. On leaving, the previous SIGABRT handler
  (faulthandler's) is back, so a failure at exit is reported as before.

  Args:
    checkpoint_dir: the run's checkpoint directory, read when the abort comes.
    heartbeat_timeout_s: the run's ``jax.distributed`` heartbeat timeout.
  """
  if jax.process_count() == 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  coordinator, index, count = _coordinator_address(), jax.process_index(), jax.process_count()

  def on_abort(signum: int) -> None:
    del signum
    # Runs on the aborting C++ thread, with the GIL (ctypes takes it); os.write and os._exit
    # avoid Python's stream locks, which the interrupted main thread may hold.
    message = lost_host_message(
      index,
      count,
      coordinator,
      _accepts_connections(coordinator),
      checkpoint_dir,
      _last_complete_step(checkpoint_dir),
    )
    os.write(2, message.encode())
    os._exit(EXIT_CODE)

  handler = _SIGNAL_HANDLER(on_abort)  # must outlive the installation: libc keeps a raw pointer
  libc = ctypes.CDLL(None)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
  previous = libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
  try:
    yield
  except jax.errors.JaxRuntimeError:
    wait_s = heartbeat_timeout_s + _VERDICT_GRACE_S
    logging.error(
      "A collective failed; waiting up to %.0f s for JAX to tell whether a process was lost.",
      wait_s,
    )
    time.sleep(wait_s)  # JAX's abort, if it comes, ends the process from its own thread meanwhile
    raise
  finally:
    libc.signal(signal.SIGABRT, previous)
