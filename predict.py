r"""Draws a checkpoint's detections on image files.

  python predict.py --config=configs/r50.py --checkpoint=PATH --out=DIR [--threshold=0.5] IMAGE...

``--config`` takes a config file or, as the Python API, a config name (``r50``, ``demo``, ...).
``--threshold`` defaults to the config's ``evaluation.score_threshold``.

Writes ``DIR/<image name>.png`` (boxes, class names and scores) and ``DIR/detections.json``; with
--attention, also ``DIR/<image name>_attention_<i>.png`` and ``.npz`` per detection: its query's
cross-attention maps per head (spatial, content, combined) in one decoder layer
(docs/attention-maps.md).
PATH is anything eval.py accepts. Class names come from the dataset's json when it is at hand,
else COCO's for a 91-class model.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and JAX load

from absl import (
  app,  # pylint: disable=g-import-not-at-top,wrong-import-position
  flags,  # pylint: disable=g-import-not-at-top,wrong-import-position
  logging,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

from conddetr_jax import (
  models,  # pylint: disable=g-import-not-at-top,wrong-import-position
  storage,  # pylint: disable=g-import-not-at-top,wrong-import-position
)
from conddetr_jax.checkpoints import weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.data import image_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.inference import prediction  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG, _CHECKPOINT = cli.define_checkpoint_flags()
_OUT = flags.DEFINE_string("out", None, "Output folder for the PNGs and detections.json.")
_THRESHOLD = flags.DEFINE_float(
  "threshold",
  None,
  "Lowest score drawn and listed; default the config's evaluation.score_threshold.",
)
_ATTENTION = flags.DEFINE_bool(
  "attention",
  False,
  "Also draw each detection's cross-attention maps per head (PNG) and save them (.npz).",
)
_ATTENTION_LAYER = flags.DEFINE_integer(
  "attention_layer", -1, "The decoder layer of --attention (-1: the last)."
)
flags.mark_flag_as_required("out")


def main(argv):
  images = argv[1:]
  if not images:
    raise app.UsageError("give at least one image file")
  for image in images:  # a mistyped name is said at once, not after the model has loaded
    image_files.check_file(image)
  config = _CONFIG.value
  threshold = config.evaluation.score_threshold if _THRESHOLD.value is None else _THRESHOLD.value
  variables, _ = weights.load_variables(config, _CHECKPOINT.value)
  logging.info(
    "detecting objects in %d images (each new image size compiles the model first)...", len(images)
  )
  records = prediction.predict_files(
    config,
    models.build_model(config),
    variables,
    images,
    _OUT.value,
    threshold,
    _ATTENTION_LAYER.value if _ATTENTION.value else None,
  )
  for record in records:
    print(prediction.describe_record(record, threshold))
  files = {
    "drawings": storage.join(_OUT.value, "*.png"),
    "detections": storage.join(_OUT.value, coco_eval.DETECTIONS_FILE),
  }
  if _ATTENTION.value:
    files["attention maps"] = storage.join(_OUT.value, "*_attention_*.png (and .npz)")
  cli.print_summary(f"Drew the detections scoring >= {threshold:g} on {len(records)} images", files)


if __name__ == "__main__":
  cli.run(main)
