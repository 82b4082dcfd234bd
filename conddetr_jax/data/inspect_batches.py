"""What the model sees: draws augmented training batches with their boxes and class names.

Usage:
  python -m conddetr_jax.inspect_batches --config=configs/r50.py --config.dataset.root=/data/coco \
      --out=batch.png [--batch_size=8] [--step=0] [--split=train]

Padding (``pad_mask``) is drawn dark, each box in a colour of its class with its name.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow loads (the data package imports it)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import ImageDraw  # pylint: disable=g-import-not-at-top,wrong-import-position

from conddetr_jax.data import coco  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "batch.png", "Output PNG.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images to draw.")
_STEP = flags.DEFINE_integer("step", 0, "Global training step of the batch (train split).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "val"], "train: augmented; val: eval resize.")


def _colour(label: int) -> tuple[int, int, int]:
  rng = np.random.default_rng(label)
  return tuple(int(v) for v in rng.integers(64, 256, size=3))


def render_batch(batch: dict[str, np.ndarray], names: dict[int, str], columns: int = 4) -> Image.Image:
  """A grid of the batch's padded images with boxes and class names.

  Args:
    batch: one batch as yielded by the iterators (image (B, H, W, 3) normalised, pad_mask, boxes
      cxcywh relative to ``size``, labels, box_valid, size, valid).
    names: category id -> name.
    columns: images per row.
  Returns:
    RGB image of ceil(B / columns) x columns tiles of (H, W).
  """
  images = batch["image"] * np.array(transforms.IMAGENET_STD) + np.array(transforms.IMAGENET_MEAN)
  images = np.clip(images * 255, 0, 255)
  images[batch["pad_mask"]] *= 0.25
  b, h, w, _ = images.shape
  columns = min(columns, b)
  rows = -(-b // columns)
  canvas = Image.new("RGB", (columns * w, rows * h))
  for i in range(b):
    tile = Image.fromarray(images[i].astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    sh, sw = batch["size"][i]
    for box, label in zip(batch["boxes"][i][batch["box_valid"][i]], batch["labels"][i][batch["box_valid"][i]]):
      cx, cy, bw, bh = box * np.array([sw, sh, sw, sh])
      colour = _colour(int(label))
      draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=colour, width=2)
      draw.text((cx - bw / 2 + 2, cy - bh / 2 + 1), names.get(int(label), str(label)), fill=colour)
    if not batch["valid"][i]:
      draw.text((4, 4), "padding example", fill=(255, 0, 0))
    canvas.paste(tile, ((i % columns) * w, (i // columns) * h))
  return canvas


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  coco.prepare_dataset(config)
  if _SPLIT.value == "train":
    it = pipeline.train_iterator(config, global_batch_size=_BATCH_SIZE.value, start_step=_STEP.value,
                                 process_index=0, process_count=1)
  else:
    it = pipeline.eval_iterator(config, global_batch_size=_BATCH_SIZE.value, process_index=0,
                                process_count=1)
  batch = next(it)
  render_batch(batch, coco.category_names(config)).save(_OUT.value)
  print(f"Wrote {_OUT.value}: {batch['image'].shape[0]} images padded to {batch['image'].shape[1:3]}, "
        f"{int(batch['box_valid'].sum())} boxes")


if __name__ == "__main__":
  cli.run(main)
