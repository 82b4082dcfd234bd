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

Two ways to make the pixels (``config.dataset.train_resize``; evaluation always uses the first):

- "pil": the original's to the last grey level. JPEGs are decoded as PIL decodes them (libjpeg's
  accurate integer IDCT; CMYK converted with PIL's own formula), every resize is PIL's bilinear
  (``pil_resample``) on 8-bit images, as the original resizes PIL images, and the 8-bit result is
  normalised as ``ToTensor`` + ``Normalize`` do.
- "fast" (training): the geometry is first mapped to the original image's pixels
  (``in_source_pixels``: the crop window taken back through the first resize and snapped to whole
  pixels), so only that window is decoded (``decode_window``) and one float resize
  (``fast_train_image``) takes it to the output size. Training pixels need not be PIL's (the
  augmentation is random); they cost a fraction of the exact path's CPU. Boxes go through the
  same box ops with the mapped geometry, so they stay exact with respect to these pixels.
"""

import io

import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from conddetr_jax.data import pil_resample

TRAIN_RESIZE_MODES = ("fast", "pil")
GEOMETRY_FIELDS = ("flip", "mid_h", "mid_w", "top", "left", "crop_h", "crop_w", "out_h", "out_w")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- host side (numpy)


def resized_size(
  h: np.ndarray, w: np.ndarray, size: np.ndarray, max_size: float | None = None
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
  return np.stack(
    [
      np.asarray(v, np.int64) for v in (flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w)
    ],
    axis=-1,
  ).astype(np.int32)


def train_geometry(
  rng: np.random.Generator, sizes: np.ndarray, ds: ml_collections.ConfigDict
) -> np.ndarray:
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
  return np.where(
    plain[:, None],
    _geometry(flip, plain_h, plain_w, zero, zero, plain_h, plain_w, plain_h, plain_w),
    _geometry(flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w),
  )


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


def check_train_resize(ds: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the field, unless ``ds.train_resize`` is one of
  ``TRAIN_RESIZE_MODES``."""
  if ds.train_resize not in TRAIN_RESIZE_MODES:
    raise ValueError(
      f"config.dataset.train_resize={ds.train_resize!r}: expected one of {TRAIN_RESIZE_MODES}"
    )


def in_source_pixels(geometry: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """The same augmentation with the first resize folded into the crop: each crop window is taken
  back through the resize to (mid_h, mid_w) into the original image's pixels, its edges rounded to
  whole pixels (each moves by at most half a source pixel), and mid becomes the original size.

  Resize, crop, resize is then crop, resize: one resampling instead of two, and only the window
  needs decoding. The plain-resize branch's window is the whole image, which maps to itself.

  Args:
    geometry: (N, 9) int32 (``GEOMETRY_FIELDS``); the window is in the flipped image, as ever.
    sizes: (N, 2) int (h, w) of the original images.
  Returns:
    (N, 9) int32 geometries with (mid_h, mid_w) = sizes and the window in source pixels; flip and
    the output size unchanged.
  """
  g = geometry.astype(np.int64)
  h, w = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)

  def edges(start, length, mid, full):
    first = np.round(start * full / mid).astype(np.int64)
    last = np.round((start + length) * full / mid).astype(np.int64)
    first = np.clip(first, 0, full - 1)
    return first, np.clip(last, first + 1, full) - first  # at least one pixel

  top, crop_h = edges(g[:, 3], g[:, 5], g[:, 1], h)
  left, crop_w = edges(g[:, 4], g[:, 6], g[:, 2], w)
  return _geometry(g[:, 0], h, w, top, left, crop_h, crop_w, g[:, 7], g[:, 8])


# ------------------------------------------------------------------------------ TF ops (tf.data)


def _pil_rgb(contents: np.ndarray | bytes) -> np.ndarray:
  """PIL's ``Image.open(...).convert('RGB')`` of encoded bytes (as ``tf.numpy_function`` passes a
  scalar string: bytes, or a 0-d array of them when eager), (h, w, 3) uint8."""
  with Image.open(io.BytesIO(np.asarray(contents).item())) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


def decode_image(contents: tf.Tensor, pil_cmyk: bool = True) -> tf.Tensor:
  """Encoded bytes -> (h, w, 3) uint8 RGB, the pixels PIL's ``convert('RGB')`` gives (what the
  original reads), whatever the format (sniffed from the bytes, not the file name): JPEG incl.
  grayscale, CMYK and progressive; PNG incl. RGBA (alpha dropped), palette and 16-bit; BMP, GIF,
  WebP. Raises InvalidArgumentError on corrupt or truncated data (for a CMYK JPEG, PIL's error:
  an OpError inside tf.data, PIL's OSError when run eagerly).

  JPEGs use libjpeg's accurate integer IDCT, as PIL does (TF's default fast IDCT is up to ~20
  grey levels off on high-quality JPEGs). Four-component (CMYK/YCCK) JPEGs, rare, are decoded by
  PIL itself: TF's CMYK -> RGB conversion truncates where PIL's rounds (a grey level off on about
  a third of the values) and TF gives no access to the CMYK values to redo it. ``pil_cmyk=False``
  leaves them to TF, so that the graph holds TF ops only (a SavedModel cannot carry a Python call).
  """

  def jpeg():
    components = tf.io.extract_jpeg_shape(contents)[2]
    accurate = lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")
    if not pil_cmyk:
      return accurate()
    return tf.cond(
      components == 4,
      lambda: tf.numpy_function(_pil_rgb, [contents], tf.uint8, stateful=False),
      accurate,
    )

  other = lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
  image = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def decode_window(contents: tf.Tensor, window: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The pixels of one window of an encoded image, and the image's full size (to check it).

  JPEGs decode only the window's blocks (``decode_and_crop_jpeg``), with the accurate IDCT PIL uses
  (measured no slower than the default fast one): PIL's pixels but for a few grey levels on the
  window's edge, where chroma upsampling lacks the neighbours outside. Other formats are decoded
  whole, then sliced.

  Args:
    contents: scalar string, the encoded bytes.
    window: (4,) int32 (top, left, height, width) in the unflipped image.
  Returns:
    (height, width, 3) uint8 RGB, and (2,) int32 (h, w) of the whole image. Raises
    InvalidArgumentError on corrupt data or a window outside the image.
  """

  def jpeg():
    return (
      tf.io.decode_and_crop_jpeg(contents, window, channels=3, dct_method="INTEGER_ACCURATE"),
      tf.io.extract_jpeg_shape(contents)[:2],
    )

  def other():
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    top, left, height, width = tf.unstack(window)
    return image[top : top + height, left : left + width], tf.shape(image)[:2]

  image, hw = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
  image.set_shape([None, None, 3])
  return image, hw


def unflipped_window(geometry: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """(4,) (top, left, crop_h, crop_w) of a geometry whose mid is the source size (see
  ``in_source_pixels``), in the unflipped image of ``width``: what ``decode_window`` reads."""
  flip, _, _, top, left, crop_h, crop_w, _, _ = tf.unstack(geometry)
  return tf.stack([top, tf.where(flip > 0, width - left - crop_w, left), crop_h, crop_w])


def hflip_boxes(boxes: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """(K, 4) absolute xyxy boxes of an image of ``width`` -> the boxes of its mirror image."""
  width = tf.cast(width, boxes.dtype)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  return tf.stack([width - x2, y1, width - x1, y2], axis=-1)


def resize_boxes(boxes: tf.Tensor, old_hw: tf.Tensor, new_hw: tf.Tensor) -> tf.Tensor:
  """(K, 4) absolute xyxy boxes scaled by new/old size per axis (as the original's resize)."""
  ratio = tf.cast(new_hw, tf.float32) / tf.cast(old_hw, tf.float32)
  return boxes * tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])


def crop_boxes(
  boxes: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor, width: tf.Tensor
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


def eval_resized_size(hw: tf.Tensor, size: int, max_size: int) -> tf.Tensor:
  """``resized_size`` of one image as TF ops, in the same float64 operations: (2,) int32 (h, w)
  -> (2,) int32 (out_h, out_w), the shorter side ``size``, the longer at most ``max_size``."""
  h, w = tf.unstack(tf.cast(hw, tf.int64))
  lo, hi = tf.cast(tf.minimum(h, w), tf.float64), tf.cast(tf.maximum(h, w), tf.float64)
  # tf.round rounds half to even, as Python's round in the original.
  size = tf.where(
    hi / lo * size > max_size,
    tf.cast(tf.round(max_size * lo / hi), tf.int64),
    tf.constant(size, tf.int64),
  )
  unchanged = ((w <= h) & (w == size)) | ((h <= w) & (h == size))
  long_side = lambda a, b: tf.cast(tf.cast(size * a, tf.float64) / tf.cast(b, tf.float64), tf.int64)
  out = tf.where(w < h, tf.stack([long_side(h, w), size]), tf.stack([size, long_side(w, h)]))
  return tf.cast(tf.where(unchanged, tf.stack([h, w]), out), tf.int32)


def resize_image(image: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  """(h, w, C) uint8 -> (hw[0], hw[1], C) uint8: PIL's bilinear resize (which the original uses),
  exactly (see ``pil_resample``); the identity when the size is unchanged."""
  return pil_resample.resize_bilinear(image, hw)


def geometry_boxes(
  boxes: tf.Tensor, labels: tf.Tensor, geometry: tf.Tensor, hw: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """The boxes of one geometry (see the module docstring): flip, resize, crop, resize, as the
  original's transforms move them.

  Args:
    boxes: (K, 4) float32 absolute xyxy in the image.
    labels: (K,) int32.
    geometry: (9,) int32, ``GEOMETRY_FIELDS``.
    hw: (2,) int32, the image's (h, w).
  Returns:
    boxes (K', 4) absolute xyxy in the output image, labels (K',): the boxes left with positive
    area after the crop.
  """
  flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w = tf.unstack(geometry)
  boxes = tf.cond(flip > 0, lambda: hflip_boxes(boxes, hw[1]), lambda: boxes)
  mid = tf.stack([mid_h, mid_w])
  boxes = resize_boxes(boxes, hw, mid)
  boxes, keep = crop_boxes(boxes, top, left, crop_h, crop_w)
  boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
  return resize_boxes(boxes, tf.stack([crop_h, crop_w]), tf.stack([out_h, out_w])), labels


def apply_geometry(
  image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, geometry: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Applies one geometry (see the module docstring) to an image and its boxes, PIL-exact.

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
  image = resize_image(image, tf.stack([mid_h, mid_w]))
  image = resize_image(image[top : top + crop_h, left : left + crop_w], tf.stack([out_h, out_w]))
  boxes, labels = geometry_boxes(boxes, labels, geometry, hw)
  return image, boxes, labels


def fast_train_image(window: tf.Tensor, geometry: tf.Tensor) -> tf.Tensor:
  """The output image of a geometry in source pixels (``in_source_pixels``), from its window.

  Flip, normalise, then one bilinear resize in float (the triangle filter, widened when shrinking
  as PIL's is): flipping and normalising the window rather than the output touches fewer pixels,
  and both commute with the resize (its weights sum to 1).

  Args:
    window: (crop_h, crop_w, 3) uint8, the window's pixels in the unflipped image
      (``decode_window`` of ``unflipped_window``).
    geometry: (9,) int32.
  Returns:
    (out_h, out_w, 3) float32, ImageNet-normalised.
  """
  flip, out = geometry[0], geometry[7:9]
  window = tf.cond(flip > 0, lambda: tf.reverse(window, axis=[1]), lambda: window)
  # A (3,) scale broadcast along the last axis is a slow elementwise loop in TF's CPU kernels; a 1x1
  # convolution with a diagonal kernel is the same affine map at a fraction of the cost.
  scale = tf.linalg.diag(1.0 / (255.0 * tf.constant(IMAGENET_STD, tf.float32)))
  offset = -tf.constant(IMAGENET_MEAN, tf.float32) / tf.constant(IMAGENET_STD, tf.float32)
  image = tf.nn.bias_add(
    tf.nn.conv2d(tf.cast(window, tf.float32)[None], scale[None, None], 1, "VALID"), offset
  )
  shrinks = tf.reduce_any(out < tf.shape(window)[:2])
  # Antialiasing (tf.image.resize's scale-and-translate kernel) costs ~3x the plain bilinear one and
  # equals it when enlarging: only pay for it when an axis shrinks.
  image = tf.cond(
    shrinks,
    lambda: tf.image.resize(image, out, antialias=True),
    lambda: tf.image.resize(image, out),
  )
  return image[0]


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """(h, w, 3) uint8 -> float32 ImageNet-normalised, in the original's float32 operations and order:
  ``ToTensor`` (x / 255), then ``Normalize`` ((x - mean) / std)."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(IMAGENET_MEAN, tf.float32)) / tf.constant(IMAGENET_STD, tf.float32)
