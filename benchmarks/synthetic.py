"""Synthetic padded batches for the benchmarks."""

import numpy as np

NUM_BOXES = 7


def synthetic_batch(
  batch: int, h: int, w: int, max_boxes: int, seed: int = 0, num_classes: int = 91
) -> dict[str, np.ndarray]:
  """A padded batch like the pipeline's: no padded pixels, NUM_BOXES boxes per image, class ids in
  [1, num_classes) (``config.model.num_classes``: COCO's 91 by default)."""
  rng = np.random.default_rng(seed)
  boxes = np.concatenate(
    [rng.uniform(0.2, 0.8, (batch, max_boxes, 2)), rng.uniform(0.05, 0.3, (batch, max_boxes, 2))],
    axis=-1,
  )
  return {
    "image": rng.normal(size=(batch, h, w, 3)).astype(np.float32),
    "pad_mask": np.zeros((batch, h, w), bool),
    "boxes": boxes.astype(np.float32),
    "labels": rng.integers(1, num_classes, (batch, max_boxes)).astype(np.int32),
    "box_valid": np.arange(max_boxes)[None].repeat(batch, 0) < NUM_BOXES,
  }
