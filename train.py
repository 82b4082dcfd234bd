"""Trains Conditional DETR: ``python train.py --config=configs/r50.py --workdir=DIR [--config.X=...]``.

Restarting the same command with the same workdir resumes from the latest complete checkpoint.
Multi-host: see the README ("Many GPUs and TPU pods"); the flags below are only needed on GPU
clusters that SLURM does not describe.
"""

import logging as std_logging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from conddetr_jax.training import distributed, lost_host, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/r50.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for jax.distributed.initialize.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", distributed.HEARTBEAT_TIMEOUT_S,
    "Multi-host: seconds without a heartbeat after which a process counts as lost and the others stop "
    "(shorter: a lost host idles the others less; longer: fewer false alarms from stalled hosts).")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s", distributed.SHUTDOWN_TIMEOUT_S,
    "Multi-host: seconds a process that has finished or failed waits at exit for the others.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO records (it logs every file of every checkpoint); its warnings pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
  """Joins a multi-host job if asked, trains, and exits with 143 if stopped by SIGTERM (75 if a host
  of a multi-host run was lost: see docs/preemption.md)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value, shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one host reports progress
  with lost_host.report_lost_host(os.path.join(_WORKDIR.value, loop.CHECKPOINT_DIR), _HEARTBEAT_TIMEOUT.value):
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    sys.exit(128 + signal.SIGTERM)  # the shell's code for "terminated": the job did not finish


if __name__ == "__main__":
  app.run(main)
