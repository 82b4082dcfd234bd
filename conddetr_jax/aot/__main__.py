"""Will it fit? Compiles the train step and the evaluation program for a TPU slice or GPU node, on
any machine.

  python -m conddetr_jax.aot --config=configs/r50.py --topology=v5e:2x2 [--size=800x1216 ...]
      [--config.model.dtype=bfloat16] [--config.per_device_batch_size=N] [--max_batch] [--noeval]
      [--nostages]
  python -m conddetr_jax.aot --config=configs/r50.py --topology=h100:8  # or h200, a100-80g,
      # a100-40g, v100-16g, v100-32g; gpu:N (N H100s); h100:2x8 (2 hosts of 8)

What it prints and how the figures are obtained: conddetr_jax/aot/__init__.py.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and XLA load: their C++ logs stay off the screen

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
import jax
from ml_collections import config_flags

from conddetr_jax.aot import report
from conddetr_jax.hardware import gpu_targets

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/r50.py.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  "v5e:2x2",
  "TPU slice, e.g. v5e:2x2, v5p:2x2x1, v4:2x2x2, v6e:2x2; or GPU node: <gpu>:<count> or "
  "<gpu>:<hosts>x<count>, <gpu> one of "
  + ", ".join(gpu_targets.GPUS)
  + " or gpu (= h100), e.g. h100:8, h100:2x8.",
)
_SIZE = flags.DEFINE_multi_string(
  "size",
  None,
  "HxW of the padded batch (repeatable). Default: the config's size buckets when it names a "
  "dataset, else the original's largest training size rounded up as the buckets are.",
)
_MAX_BATCH = flags.DEFINE_bool(
  "max_batch",
  False,
  "Also search the largest per-device batch that fits (one compile per try: a line through "
  "the measured peaks predicts it, compiles confirm it; doubling and bisection where the peaks are "
  "not affine).",
)
_STAGES = flags.DEFINE_bool(
  "stages",
  None,
  "Also compile each stage of the train step alone (backbone, input projection, encoder, decoder, "
  "heads, criterion, matching, optimizer update) for a table of its GFLOP, GB accessed and "
  "roofline time. Default: on where the compiler gives a cost analysis (TPUs), off for GPUs.",
)
_EVAL = flags.DEFINE_bool(
  "eval", True, "Also compile the evaluation program (forward + post-processing)."
)


def main(argv: list[str]) -> None:
  """Flags -> ``report.run``; a missing compiler, a failed GPU compile or bad input is a user error
  (``cli.run`` prints it as one line)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/r50.py")
  jax.config.update(
    "jax_platforms", "cpu"
  )  # the host side runs on the CPU; the TPU or GPU is compile-only
  logging.set_verbosity(logging.WARNING)
  sizes = (
    [report.parse_size(s) for s in _SIZE.value] if _SIZE.value else report.default_sizes(config)
  )
  report.run(
    config,
    _TOPOLOGY.value,
    sizes,
    max_batch=_MAX_BATCH.value,
    with_eval=_EVAL.value,
    with_stages=_STAGES.value,
  )


if __name__ == "__main__":
  cli.run(main)
