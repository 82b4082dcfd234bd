"""The original's DETR transforms, split into host-side sampling and TF ops that apply it.

Every random choice of the original's train transforms (``RandomHorizontalFlip``, ``RandomSelect``
between ``RandomResize`` and resize + ``RandomSizeCrop`` + resize) is drawn on the host in numpy,
as a *geometry*: nine integers per image (``GEOMETRY_FIELDS``). Sizes follow the original's
``get_size_with_aspect_ratio`` exactly, including its rounding. The TF side is then a pure
function of (image, geometry): an item is reproducible from (seed, epoch) alone, and the output
size of every image is known before any pixel is decoded (which is what size buckets need).

A geometry means: flip horizontally (if ``flip``), resize to (mid_h, mid_w), crop the window
(top, left, crop_h, crop_w), resize to (out_h, out_w). The plain-resize branch and evaluation use
a crop window covering the whole resized image and out == mid.

Pixels are the original's to the last grey level: JPEGs are decoded as PIL decodes them (libjpeg's
accurate integer IDCT; CMYK converted with PIL's own formula), every resize is PIL's bilinear
(``pil_resample``) on 8-bit images, as the original resizes PIL images, and the 8-bit result is
normalised as ``ToTensor`` + ``Normalize`` do.
"""

import io

import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from conddetr_jax.data import pil_resample

GEOMETRY_FIELDS = ("flip", "mid_h", "mid_w", "top", "left", "crop_h", "crop_w", "out_h", "out_w")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- host side (numpy)

def resized_size(h: np.ndarray, w: np.ndarray, size: np.ndarray, max_size: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The original's ``get_size_with_aspect_ratio``, vectorised: the shorter side becomes ``size``,
  shrunk so that the longer side stays <= ``max_size``; the longer side is truncated, not rounded.

  Args:
    h, w: (N,) ints, image sizes.
    size: (N,) or scalar int, target shorter side.
    max_size: cap on the longer side, or None.
  Returns:
    (out_h, out_w), each (N,) int64.
  """
  h, w = np.asarray(h, np.int64), np.asarray(w, np.int64)
  size = np.broadcast_to(np.asarray(size, np.int64), h.shape)
  if max_size is not None:
    lo = np.minimum(h, w).astype(np.float64)
    hi = np.maximum(h, w).astype(np.float64)
    # Same float operations, in the same order, as the original (Python round = half to even).
    size = np.where(hi / lo * size > max_size, np.round(max_size * lo / hi).astype(np.int64), size)
  unchanged = ((w <= h) & (w == size)) | ((h <= w) & (h == size))
  out_h = np.where(w < h, (size * h / w).astype(np.int64), size)
  out_w = np.where(w < h, size, (size * w / h).astype(np.int64))
  return np.where(unchanged, h, out_h), np.where(unchanged, w, out_w)


def _geometry(flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w) -> np.ndarray:
  return np.stack([np.asarray(v, np.int64) for v in (flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h,
                                                     out_w)], axis=-1).astype(np.int32)


def train_geometry(rng: np.random.Generator, sizes: np.ndarray, ds: ml_collections.ConfigDict) -> np.ndarray:
  """Draws the train augmentation of each image.

  hflip (p=0.5); then with p=0.5 ``RandomResize(train_scales, max_size=train_max_size)``, else
  ``RandomResize(crop_resize_scales)``, ``RandomSizeCrop(crop_min_size, crop_max_size)``,
  ``RandomResize(train_scales, max_size=train_max_size)``. Where an image is smaller than
  ``crop_min_size`` (the original would fail), the crop side is drawn in [side, side].

  Args:
    rng: the generator; the same draws are made for every image whatever its branch.
    sizes: (N, 2) int (h, w) of the original images.
    ds: ``config.dataset``.
  Returns:
    (N, 9) int32 geometries (``GEOMETRY_FIELDS``).
  """
  h, w = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
  n = len(h)
  flip = rng.random(n) < 0.5
  plain = rng.random(n) < 0.5
  scales = np.asarray(ds.train_scales, np.int64)
  plain_h, plain_w = resized_size(h, w, rng.choice(scales, n), ds.train_max_size)
  mid_h, mid_w = resized_size(h, w, rng.choice(np.asarray(ds.crop_resize_scales, np.int64), n))
  hi_w, hi_h = np.minimum(mid_w, ds.crop_max_size), np.minimum(mid_h, ds.crop_max_size)
  crop_w = rng.integers(np.minimum(ds.crop_min_size, hi_w), hi_w + 1)
  crop_h = rng.integers(np.minimum(ds.crop_min_size, hi_h), hi_h + 1)
  top = rng.integers(0, mid_h - crop_h + 1)
  left = rng.integers(0, mid_w - crop_w + 1)
  out_h, out_w = resized_size(crop_h, crop_w, rng.choice(scales, n), ds.train_max_size)
  zero = np.zeros(n, np.int64)
  return np.where(plain[:, None],
                  _geometry(flip, plain_h, plain_w, zero, zero, plain_h, plain_w, plain_h, plain_w),
                  _geometry(flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w))


def eval_geometry(sizes: np.ndarray, ds: ml_collections.ConfigDict) -> np.ndarray:
  """The eval transform, ``RandomResize([eval_size], max_size=eval_max_size)``, as (N, 9) int32."""
  oh, ow = resized_size(sizes[:, 0], sizes[:, 1], ds.eval_size, ds.eval_max_size)
  zero = np.zeros(len(oh), np.int64)
  return _geometry(zero, oh, ow, zero, zero, oh, ow, oh, ow)


def limit_output_size(geometry: np.ndarray, max_side: int) -> np.ndarray:
  """Shrinks the output of the rare geometries whose longer side exceeds ``max_side`` (extreme
  aspect ratios: the original's rounding can overshoot ``max_size`` by a few pixels), keeping the
  aspect ratio, so that every output fits the largest bucket.

  Args:
    geometry: (N, 9) int32.
    max_side: the largest allowed output side.
  Returns:
    (N, 9) int32, equal to ``geometry`` where it already fits.
  """
  out = geometry[:, 7:9].astype(np.int64)
  longest = out.max(axis=1, keepdims=True)
  shrunk = np.maximum(out * max_side // np.maximum(longest, 1), 1)
  geometry = geometry.copy()
  geometry[:, 7:9] = np.where(longest > max_side, shrunk, out)
  return geometry


# ------------------------------------------------------------------------------ TF ops (tf.data)

def _pil_rgb(contents: np.ndarray | bytes) -> np.ndarray:
  """PIL's ``Image.open(...).convert('RGB')`` of encoded bytes (as ``tf.numpy_function`` passes a
  scalar string: bytes, or a 0-d array of them when eager), (h, w, 3) uint8."""
  with Image.open(io.BytesIO(np.asarray(contents).item())) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """Encoded bytes -> (h, w, 3) uint8 RGB, the pixels PIL's ``convert('RGB')`` gives (what the
  original reads), whatever the format (sniffed from the bytes, not the file name): JPEG incl.
  grayscale, CMYK and progressive; PNG incl. RGBA (alpha dropped), palette and 16-bit; BMP, GIF,
  WebP. Raises InvalidArgumentError on corrupt or truncated data (for a CMYK JPEG, PIL's error:
  an OpError inside tf.data, PIL's OSError when run eagerly).

  JPEGs use libjpeg's accurate integer IDCT, as PIL does (TF's default fast IDCT is up to ~20
  grey levels off on high-quality JPEGs). Four-component (CMYK/YCCK) JPEGs, rare, are decoded by
  PIL itself: TF's CMYK -> RGB conversion truncates where PIL's rounds (a grey level off on about
  a third of the values) and TF gives no access to the CMYK values to redo it.
  """
  def jpeg():
    components = tf.io.extract_jpeg_shape(contents)[2]
    accurate = lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.cond(components == 4, lambda: tf.numpy_function(_pil_rgb, [contents], tf.uint8, stateful=False),
                   accurate)

  other = lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
  image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def hflip_boxes(boxes: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """(K, 4) absolute xyxy boxes of an image of ``width`` -> the boxes of its mirror image."""
  width = tf.cast(width, boxes.dtype)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  return tf.stack([width - x2, y1, width - x1, y2], axis=-1)


def resize_boxes(boxes: tf.Tensor, old_hw: tf.Tensor, new_hw: tf.Tensor) -> tf.Tensor:
  """(K, 4) absolute xyxy boxes scaled by new/old size per axis (as the original's resize)."""
  ratio = tf.cast(new_hw, tf.float32) / tf.cast(old_hw, tf.float32)
  return boxes * tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])


def crop_boxes(boxes: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor, width: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
  """The original's ``crop`` on boxes: shift, clip to the window, flag the boxes left with area.

  Args:
    boxes: (K, 4) absolute xyxy.
    top, left, height, width: the crop window, ints.
  Returns:
    (K, 4) cropped boxes and (K,) bool: True where x2 > x1 and y2 > y1 (the boxes to keep).
  """
  offset = tf.cast(tf.stack([left, top, left, top]), tf.float32)
  limit = tf.cast(tf.stack([width, height, width, height]), tf.float32)
  cropped = tf.clip_by_value(boxes - offset, 0.0, limit)
  keep = (cropped[:, 2] > cropped[:, 0]) & (cropped[:, 3] > cropped[:, 1])
  return cropped, keep


def normalized_cxcywh(boxes: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  """(K, 4) absolute xyxy -> (K, 4) cxcywh divided by the image (w, h, w, h)."""
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  h, w = tf.unstack(tf.cast(hw, tf.float32))
  return tf.stack([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h], axis=-1)


def resize_image(image: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  """(h, w, C) uint8 -> (hw[0], hw[1], C) uint8: PIL's bilinear resize (which the original uses),
  exactly (see ``pil_resample``); the identity when the size is unchanged."""
  return pil_resample.resize_bilinear(image, hw)


def apply_geometry(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, geometry: tf.Tensor
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Applies one geometry (see the module docstring) to an image and its boxes.

  The original's order on a PIL image: flip, resize (to 8 bits), crop, resize (to 8 bits).

  Args:
    image: (h, w, 3) uint8.
    boxes: (K, 4) float32 absolute xyxy in the image.
    labels: (K,) int32.
    geometry: (9,) int32, ``GEOMETRY_FIELDS``.
  Returns:
    image (out_h, out_w, 3) uint8, boxes (K', 4) absolute xyxy in it, labels (K',):
    the boxes left with positive area after the crop.
  """
  flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w = tf.unstack(geometry)
  hw = tf.shape(image)[:2]
  image = tf.cond(flip > 0, lambda: tf.reverse(image, axis=[1]), lambda: image)
  boxes = tf.cond(flip > 0, lambda: hflip_boxes(boxes, hw[1]), lambda: boxes)
  mid = tf.stack([mid_h, mid_w])
  image = resize_image(image, mid)
  boxes = resize_boxes(boxes, hw, mid)
  image = image[top:top + crop_h, left:left + crop_w]
  boxes, keep = crop_boxes(boxes, top, left, crop_h, crop_w)
  boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
  out = tf.stack([out_h, out_w])
  image = resize_image(image, out)
  boxes = resize_boxes(boxes, tf.stack([crop_h, crop_w]), out)
  return image, boxes, labels


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """(h, w, 3) uint8 -> float32 ImageNet-normalised, in the original's float32 operations and order:
  ``ToTensor`` (x / 255), then ``Normalize`` ((x - mean) / std)."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(IMAGENET_MEAN, tf.float32)) / tf.constant(IMAGENET_STD, tf.float32)
