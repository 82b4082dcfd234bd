r"""Evaluates a checkpoint with COCO box AP (pycocotools), on every device of every process.

  python eval.py --config=configs/r50.py --checkpoint=PATH --workdir=DIR \
      [--config.dataset.root=/path/to/coco]

PATH: a training workdir (its latest step), one step folder (``DIR/checkpoints/<step>``), an Orbax
checkpoint from ``python -m conddetr_jax.convert``, or the original's ``.pth`` (converted on the
fly). Prints pycocotools' summary, writes ``DIR/detections.json`` (COCO results format) and appends
the metrics to ``DIR/metrics.jsonl``.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and JAX load

from absl import (
  app,  # pylint: disable=g-import-not-at-top,wrong-import-position
  flags,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

from conddetr_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.evaluation import (
  checkpoint_eval,  # pylint: disable=g-import-not-at-top,wrong-import-position
  coco_eval,  # pylint: disable=g-import-not-at-top,wrong-import-position
)
from conddetr_jax.training import (
  distributed,  # pylint: disable=g-import-not-at-top,wrong-import-position
  metrics,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

_CONFIG, _CHECKPOINT = cli.define_checkpoint_flags()
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where detections.json and metrics.jsonl are written."
)
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "train"], "The split to evaluate.")
distributed.define_flags()
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  result = checkpoint_eval.evaluate_checkpoint(
    _CONFIG.value, _CHECKPOINT.value, _WORKDIR.value, _SPLIT.value
  )
  if result.summary:
    print(f"COCO bbox, {result.num_images} {_SPLIT.value} images, checkpoint {_CHECKPOINT.value}:")
    print(result.summary, end="")
    cli.print_summary(
      f"Evaluated {result.num_images} {_SPLIT.value} images",
      {
        "detections": storage.join(_WORKDIR.value, coco_eval.DETECTIONS_FILE),
        "metrics": storage.join(_WORKDIR.value, metrics.METRICS_FILE),
      },
      result.metrics,
    )


if __name__ == "__main__":
  cli.run(main)
