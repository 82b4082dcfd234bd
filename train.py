"""Trains Conditional DETR:
``python train.py --config=configs/r50.py --workdir=DIR [--config.X=...]``.

Restarting the same command with the same workdir resumes from the latest complete checkpoint.
Multi-host: see the README ("Many devices: GPUs, TPUs, clusters"); the multi-host flags
(``distributed.define_flags``) are only needed on GPU clusters that SLURM does not describe.
"""

import signal
import sys

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and JAX load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from conddetr_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.checkpoints import weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.training import distributed, loop, lost_host, metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/r50.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, metrics and TensorBoard events."
)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  """Joins a multi-host job if asked, trains, and exits with 143 if stopped by SIGTERM (75 if a host
  of a multi-host run was lost: see docs/preemption.md)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one host reports progress
  with lost_host.report_lost_host(
    storage.join(_WORKDIR.value, weights.CHECKPOINT_DIR), flags.FLAGS.heartbeat_timeout_s
  ):
    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    workdir = _WORKDIR.value
    predictions = storage.join(workdir, loop.PREDICTIONS_DIR)
    cli.print_summary(
      f"{'Stopped (SIGTERM) at' if result.preempted else 'Trained'} step "
      f"{result.step}/{result.total_steps}",
      {
        "checkpoints": storage.join(workdir, weights.CHECKPOINT_DIR),
        "metrics": storage.join(workdir, metrics.METRICS_FILE),
        "TensorBoard": storage.join(workdir, metrics.TENSORBOARD_DIR),
        # The key names the metric, so it is only built when weights were kept.
        **(
          {
            f"best {result.best['metric']}": f"{result.best['path']} (step "
            f"{result.best['step']}, {result.best['value']:.4f})"
          }
          if result.best
          else {}
        ),
        "predictions": f"{predictions}/*.png ({len(result.prediction_images)} files)"
        if result.prediction_images
        else None,
      },
      result.eval_metrics,
    )
  if result.preempted:
    sys.exit(128 + signal.SIGTERM)  # the shell's code for "terminated": the job did not finish


if __name__ == "__main__":
  cli.run(main)
