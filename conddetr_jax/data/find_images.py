"""The image files of a config's dataset, found (and the dataset generated) without typing the
cache folder's name (``python -m conddetr_jax.find_images`` prints them)."""

import ml_collections

from conddetr_jax.data import coco


def image_paths(config: ml_collections.ConfigDict, split: str = "val", count: int = 1) -> list[str]:
  """The first ``count`` image files of ``split`` (in image-id order), preparing the dataset first.

  Raises:
    FileNotFoundError: the config names no dataset.
  """
  coco.prepare_dataset(config)
  images = coco.load_split(config, split)
  return [images.path(i) for i in range(min(count, len(images)))]
