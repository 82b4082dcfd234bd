"""Training batches drawn as the model is fed them: padding dark, each box in its class's colour
with the class name (``python -m conddetr_jax.inspect_batches`` writes one to a PNG)."""

import numpy as np
from PIL import Image, ImageDraw

from conddetr_jax.data import transforms


def _colour(label: int) -> tuple[int, int, int]:
  rng = np.random.default_rng(label)
  return tuple(int(v) for v in rng.integers(64, 256, size=3))


def render_batch(
  batch: dict[str, np.ndarray], names: dict[int, str], columns: int = 4
) -> Image.Image:
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
    for box, label in zip(
      batch["boxes"][i][batch["box_valid"][i]], batch["labels"][i][batch["box_valid"][i]]
    ):
      cx, cy, bw, bh = box * np.array([sw, sh, sw, sh])
      colour = _colour(int(label))
      draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=colour, width=2)
      draw.text((cx - bw / 2 + 2, cy - bh / 2 + 1), names.get(int(label), str(label)), fill=colour)
    if not batch["valid"][i]:
      draw.text((4, 4), "padding example", fill=(255, 0, 0))
    canvas.paste(tile, ((i % columns) * w, (i // columns) * h))
  return canvas
