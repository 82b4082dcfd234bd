r"""Prints the paths of a config's dataset images, e.g. to hand a val image to predict.py.

  python -m conddetr_jax.find_images --config=configs/demo.py [--split=val] [--count=1]

The synthetic dataset lives in a cache folder whose name encodes its parameters; this finds it
(generating it if absent) without the name being typed:

  python predict.py --config=configs/demo.py --checkpoint=/tmp/conddetr_demo --out=/tmp/pred \
      $(python -m conddetr_jax.find_images --config=configs/demo.py --count=2)
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow loads (the data package imports it)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from conddetr_jax.data import coco, find_images

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/demo.py.", lock_config=True
)
_SPLIT = flags.DEFINE_enum("split", "val", list(coco.SPLITS), "The split whose images are listed.")
_COUNT = flags.DEFINE_integer("count", 1, "How many image paths to print.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  """Prints one path per line."""
  del argv
  print("\n".join(find_images.image_paths(_CONFIG.value, _SPLIT.value, _COUNT.value)))


if __name__ == "__main__":
  cli.run(main)
