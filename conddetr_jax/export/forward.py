"""The detector as a pure function of its flattened weights, at fixed padded sizes (buckets).

Exported programs take the weights as arguments (stored once beside them), not as constants: every
bucket's program then shares one copy, and a SavedModel holds them as variables.

The model's padded height and width cannot be symbolic (the mask's downsampling computes its
scale from them in numpy), so each format is written once per bucket; the batch is symbolic.
The buckets are the original's evaluation envelope: the shorter side ``eval_size`` and the longer
``eval_max_size``, rounded up to ``size_divisibility``, landscape and portrait. Every evaluation
image fits one of them, and padding does not change what the model says (docs/evaluation.md,
"Padding does not change the detections").
"""

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from conddetr_jax import models
from conddetr_jax.data import batching, image_files

Forward = Callable[[Sequence[jax.Array], jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def buckets(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """The padded (height, width) sizes an export serves: landscape first, then portrait if it
  differs.

  Raises:
    ValueError: the config has no ``eval_max_size`` (the envelope would be unbounded).
  """
  ds = config.dataset
  if ds.eval_max_size is None:
    raise ValueError("config.dataset.eval_max_size is None: an export needs a bounded image size")
  short, long = (
    int(v)
    for v in batching.round_up(np.array([ds.eval_size, ds.eval_max_size]), ds.size_divisibility)
  )
  return [(short, long)] if short == long else [(short, long), (long, short)]


def bucket_of(hw: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> int:
  """Index of the smallest bucket of ``sizes`` that holds an image of ``hw`` (height, width).

  Raises:
    ValueError: no bucket holds it.
  """
  fits = [i for i, (h, w) in enumerate(sizes) if hw[0] <= h and hw[1] <= w]
  if not fits:
    raise ValueError(f"an image of {hw[0]}x{hw[1]} fits none of the buckets {list(sizes)}")
  return min(fits, key=lambda i: sizes[i][0] * sizes[i][1])


def flat_weights(variables: Any) -> tuple[list[np.ndarray], Any]:
  """The variables' leaves as float host arrays (the order ``forward_fn`` takes them) and their
  tree."""
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  return [np.asarray(leaf) for leaf in leaves], treedef


def forward_fn(config: ml_collections.ConfigDict, treedef: Any) -> Forward:
  """``f(weights, image, pad_mask) -> (logits (B, Q, C), boxes (B, Q, 4) cxcywh in [0, 1])``.

  ``weights``: the leaves of ``flat_weights``; image (B, H, W, 3) float32 normalised; pad_mask
  (B, H, W) bool, True on padding.
  """
  model = models.build_model(config)

  def forward(weights, image, pad_mask):
    out = model.apply(
      jax.tree_util.tree_unflatten(treedef, list(weights)), image, pad_mask, train=False
    )
    return out["pred_logits"], out["pred_boxes"]

  return forward


def padded_batch(
  pixels: Sequence[np.ndarray], config: ml_collections.ConfigDict, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Images prepared as predict.py does (``image_files.prepare_image``), padded to one bucket.

  Args:
    pixels: (h, w, 3) uint8 RGB images.
    config: the run config (evaluation sizes).
    size: the bucket (H, W); every resized image must fit it.
  Returns:
    image (B, H, W, 3) float32, pad_mask (B, H, W) bool, orig_size (B, 2) int32 (h, w).
  """
  image = np.zeros((len(pixels), *size, 3), np.float32)
  pad_mask = np.ones((len(pixels), *size), bool)
  orig_size = np.zeros((len(pixels), 2), np.int32)
  for i, p in enumerate(pixels):
    loaded = image_files.prepare_image(p, config)
    h, w = (~loaded.pad_mask[0]).sum(0).max(), (~loaded.pad_mask[0]).sum(1).max()
    if h > size[0] or w > size[1]:
      raise ValueError(f"image {i} resized to {h}x{w} does not fit the bucket {size[0]}x{size[1]}")
    image[i, :h, :w] = loaded.image[0, :h, :w]
    pad_mask[i, :h, :w] = False
    orig_size[i] = loaded.orig_size[0]
  return image, pad_mask, orig_size
