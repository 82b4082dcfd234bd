"""An image file read as the model takes it at evaluation (predict.py's input).

Images are read with PIL and resized as the original's evaluation (shorter side ``eval_size``,
longer side at most ``eval_max_size``; PIL bilinear, as the original), then padded to a multiple
of ``size_divisibility``.
"""

import dataclasses
import io

import ml_collections
import numpy as np
from PIL import Image, ImageOps

from conddetr_jax import storage
from conddetr_jax.data import batching, transforms


@dataclasses.dataclass(frozen=True)
class LoadedImage:
  """One image file, as drawn and as the model takes it.

  Attributes:
    pixels: (h, w, 3) uint8 RGB, EXIF orientation applied.
    image: (1, H, W, 3) float32, resized, ImageNet-normalised, zero-padded to a multiple of
      ``size_divisibility``.
    pad_mask: (1, H, W) bool, True on padding.
    orig_size: (1, 2) int32 (h, w) of ``pixels``.
  """

  pixels: np.ndarray
  image: np.ndarray
  pad_mask: np.ndarray
  orig_size: np.ndarray


def check_file(path: str) -> None:
  """Raises ``FileNotFoundError`` ("image not found: PATH") unless image file ``path`` exists."""
  storage.check_reachable(path, "image")
  if not storage.path(path).is_file():
    raise FileNotFoundError(f"image not found: {path}")


def read_image(path: str) -> np.ndarray:
  """An image file of any format PIL knows, as (h, w, 3) uint8 RGB with its EXIF orientation
  applied.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable image (the message names it).
  """
  check_file(path)
  try:
    with Image.open(io.BytesIO(storage.read_bytes(path))) as f:
      # Phone photos store their rotation in EXIF: apply it, so boxes match what viewers show.
      return np.asarray(ImageOps.exif_transpose(f).convert("RGB"), np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def prepare_image(pixels: np.ndarray, config: ml_collections.ConfigDict) -> LoadedImage:
  """(h, w, 3) uint8 RGB pixels prepared as the evaluation does: resized (shorter side
  ``eval_size``, longer at most ``eval_max_size``, PIL bilinear), ImageNet-normalised, padded to a
  multiple of ``size_divisibility``."""
  pil = Image.fromarray(pixels)
  ds = config.dataset
  h, w = pil.height, pil.width
  out_h, out_w = (
    int(v[0])
    for v in transforms.resized_size(np.array([h]), np.array([w]), ds.eval_size, ds.eval_max_size)
  )
  resized = np.asarray(
    pil.resize((out_w, out_h), Image.BILINEAR) if (out_h, out_w) != (h, w) else pil, np.float32
  )
  normalised = (resized / 255.0 - np.array(transforms.IMAGENET_MEAN)) / np.array(
    transforms.IMAGENET_STD
  )
  pad_h, pad_w = (int(v) for v in batching.round_up(np.array([out_h, out_w]), ds.size_divisibility))
  image = np.zeros((1, pad_h, pad_w, 3), np.float32)
  image[0, :out_h, :out_w] = normalised
  pad_mask = np.ones((1, pad_h, pad_w), bool)
  pad_mask[0, :out_h, :out_w] = False
  return LoadedImage(
    pixels=pixels, image=image, pad_mask=pad_mask, orig_size=np.array([[h, w]], np.int32)
  )


def load_image(path: str, config: ml_collections.ConfigDict) -> LoadedImage:
  """Reads an image file (``read_image``) and prepares it as the evaluation does
  (``prepare_image``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable image (the message names it).
  """
  return prepare_image(read_image(path), config)
