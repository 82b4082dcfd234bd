"""The batch: every key a training or evaluation batch carries, with its shape and dtype.

The one description of the batch that the pipeline yields, the evaluation program takes, the aot
tool compiles for and the tests build. A batch of B images padded to H x W (one size bucket):

  image      (B, H, W, 3) float32  normalised with ImageNet's mean and std; zero on padding
  pad_mask   (B, H, W)    bool     True on padded pixels (the original's convention)
  boxes      (B, M, 4)    float32  cxcywh in [0, 1] of the *unpadded* image; M = max_boxes
  labels     (B, M)       int32    category ids
  box_valid  (B, M)       bool     which box slots hold a box (they come first)
  image_id   (B,)         int64    the json's image id (-1 for a blank example)
  orig_size  (B, 2)       int32    (h, w) of the image file: detections are scaled to it
  size       (B, 2)       int32    (h, w) of the image after resizing, before padding
  valid      (B,)         bool     False for the blank examples that complete the last batch

Evaluation sends the device only ``EVAL_KEYS``, with ``image_id`` as int32 (JAX's integer width).
"""

from typing import NamedTuple

import numpy as np


class Field(NamedTuple):
  """One key of the batch: its shape and numpy dtype."""

  shape: tuple[int, ...]
  dtype: type


EVAL_KEYS = ("image", "pad_mask", "orig_size", "valid", "image_id")


def train_batch(batch_size: int, hw: tuple[int, int], max_boxes: int) -> dict[str, Field]:
  """The training batch of ``batch_size`` images padded to ``hw`` with ``max_boxes`` box slots."""
  b, (h, w), m = batch_size, hw, max_boxes
  return {
    "image": Field((b, h, w, 3), np.float32),
    "pad_mask": Field((b, h, w), np.bool_),
    "boxes": Field((b, m, 4), np.float32),
    "labels": Field((b, m), np.int32),
    "box_valid": Field((b, m), np.bool_),
    "image_id": Field((b,), np.int64),
    "orig_size": Field((b, 2), np.int32),
    "size": Field((b, 2), np.int32),
    "valid": Field((b,), np.bool_),
  }


def eval_batch(batch_size: int, hw: tuple[int, int]) -> dict[str, Field]:
  """What evaluation hands the device: ``EVAL_KEYS`` of the batch, ``image_id`` as int32."""
  fields = train_batch(batch_size, hw, max_boxes=0)
  fields["image_id"] = Field((batch_size,), np.int32)
  return {key: fields[key] for key in EVAL_KEYS}


def layout(batch: dict[str, np.ndarray]) -> dict[str, Field]:
  """The (shape, dtype) of each key of a concrete batch, comparable with ``train_batch``'s."""
  return {key: Field(tuple(v.shape), np.dtype(v.dtype).type) for key, v in batch.items()}
