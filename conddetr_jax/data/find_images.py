r"""Prints the paths of a config's dataset images, e.g. to hand a val image to predict.py.

  python -m conddetr_jax.find_images --config=configs/demo.py [--split=val] [--count=1]

The synthetic dataset lives in a cache folder whose name encodes its parameters; this finds it
(generating it if absent) without the name being typed:

  python predict.py --config=configs/demo.py --checkpoint=/tmp/conddetr_demo --out=/tmp/pred \
      $(python -m conddetr_jax.find_images --config=configs/demo.py --count=2)
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow loads (the data package imports it)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from conddetr_jax.data import coco  # pylint: disable=g-import-not-at-top,wrong-import-position


def image_paths(config: ml_collections.ConfigDict, split: str = "val", count: int = 1) -> list[str]:
  """The first ``count`` image files of ``split`` (in image-id order), preparing the dataset first.

  Raises:
    FileNotFoundError: the config names no dataset.
  """
  coco.prepare_dataset(config)
  images = coco.load_split(config, split)
  return [images.path(i) for i in range(min(count, len(images)))]


def main(argv: list[str]) -> None:
  """Prints one path per line."""
  del argv
  print("\n".join(image_paths(flags.FLAGS.config, flags.FLAGS.split, flags.FLAGS.count)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.", lock_config=True)
  flags.DEFINE_enum("split", "val", list(coco.SPLITS), "The split whose images are listed.")
  flags.DEFINE_integer("count", 1, "How many image paths to print.")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
