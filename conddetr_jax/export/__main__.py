r"""Exports a trained detector for serving, and checks each artifact against the JAX model.

  python -m conddetr_jax.export --config=configs/r50.py --checkpoint=PATH --out=DIR \
      [--format=stablehlo,saved_model,onnx] [--images=a.jpg,b.png] [--tolerance=1e-3]

Writes ``DIR/stablehlo/``, ``DIR/saved_model/``, ``DIR/onnx/`` (docs/export.md), runs each on a
few images (``--images``, else synthetic ones) and prints the largest difference from the model;
above ``--tolerance`` it is an error.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and JAX load

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from conddetr_jax.checkpoints import weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.export import (
  verify,  # pylint: disable=g-import-not-at-top,wrong-import-position
  writer,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

_CONFIG, _CHECKPOINT = cli.define_checkpoint_flags()
_OUT = flags.DEFINE_string("out", None, "Output folder (one subfolder per format).")
_FORMAT = flags.DEFINE_list(
  "format", list(writer.FORMATS), f"Formats to write: {', '.join(writer.FORMATS)}."
)
_IMAGES = flags.DEFINE_list(
  "images", [], "Image files to check the exports on (default: 3 synthetic images)."
)
_TOLERANCE = flags.DEFINE_float(
  "tolerance", 1e-3, "Largest difference allowed in logits, boxes and scores."
)
flags.mark_flag_as_required("out")


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  variables, _ = weights.load_variables(config, _CHECKPOINT.value)
  for line in writer.export(
    config,
    variables,
    _OUT.value,
    _FORMAT.value,
    verify.sample_images(_IMAGES.value),
    _TOLERANCE.value,
  ):
    print(line)


if __name__ == "__main__":
  cli.run(main)
