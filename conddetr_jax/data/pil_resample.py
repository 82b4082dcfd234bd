"""PIL's bilinear ``Image.resize``, to the last grey level, as TF ops.

The original resizes PIL images (torchvision's ``F.resize`` on a PIL image calls
``Image.resize(size, BILINEAR)``). TF's bilinear resize differs from it by up to a grey level or
more (it works in float and samples the triangle filter differently), so this module computes
what Pillow computes (its ``libImaging/Resample.c``):

- two separable passes, each skipped when that side keeps its size; the result of the first is an
  8-bit image (rounded and clipped), which the second reads. Horizontal first, except where the
  height shrinks by more than twice as many pixels as the width (vertical first then, so the
  horizontal pass has fewer rows): that exception is recent Pillow's (13.0.0 is the one checked
  here); older Pillow always went horizontal first, which differs from this by at most a grey
  level in those cases. Enlarging (COCO evaluation: 640x480 -> 1066x800) is the same in all;
- per output pixel i, the filter is centred on input coordinate c = (i + 0.5) * in / out; when
  shrinking it is widened by in / out (antialiasing), so its support is s = max(in / out, 1);
  the input pixels j with trunc(c - s + 0.5) <= j < trunc(c + s + 0.5) (clamped to the image)
  get the weight tri((j - c + 0.5) / max(in / out, 1)), tri(x) = max(1 - |x|, 0), normalised to
  sum 1 (summed in order, in float64);
- the weights become fixed-point integers trunc(0.5 + w * 2**22); an output is
  (sum of pixel * weight + 2**21) >> 22, clipped to [0, 255].

The arithmetic is done in the same types as Pillow (float64 for the weights, int32 for the sums:
255 * (2**22 + a few) + 2**21 < 2**31), so the result is bit-identical, not just close.
"""

import tensorflow as tf

_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 bits - 8 (value) - 2 (headroom)


def bilinear_taps(in_size: tf.Tensor, out_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The input pixels and fixed-point weights of PIL's bilinear filter along one axis.

  Args:
    in_size, out_size: int32 scalars, the axis length before and after resizing.
  Returns:
    index (out_size, K) int32 and weight (out_size, K) int32 (weights scaled by 2**22), K the
    largest number of input pixels an output reads (2 or 3 when enlarging); taps beyond an
    output's window have weight 0 (and an index clamped into the image).
  """
  in_size = tf.convert_to_tensor(in_size, tf.int32)
  out_size = tf.convert_to_tensor(out_size, tf.int32)
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.0)
  support = filter_scale  # the triangle's support is 1, widened by the shrink factor
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  # float -> int casts truncate towards zero, as C's (int) does.
  first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  count = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
  taps = tf.range(tf.reduce_max(count))
  position = tf.cast(first[:, None] + taps[None], tf.float64)
  inverse_scale = 1.0 / filter_scale
  weight = tf.maximum(1.0 - tf.abs((position - center[:, None] + 0.5) * inverse_scale), 0.0)
  weight = tf.where(taps[None] < count[:, None], weight, 0.0)
  # Summed tap by tap, left to right, like Pillow: another order may change the last bit.
  total = tf.foldl(
    lambda acc, column: acc + column,
    tf.transpose(weight),
    initializer=tf.zeros([out_size], tf.float64),
  )
  weight = tf.where(total[:, None] != 0.0, weight / total[:, None], weight)
  # Bilinear weights are never negative, so Pillow's rounding is trunc(0.5 + w * 2**22).
  fixed = tf.cast(0.5 + weight * float(1 << _PRECISION_BITS), tf.int32)
  index = tf.minimum(first[:, None] + taps[None], in_size - 1)
  return index, fixed


def _resample_rows(image: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
  """One pass along axis 0: (h, W, C) int32 in [0, 255] -> (out_size, W, C), rounded and clipped
  to [0, 255] as Pillow does. Whole rows are gathered (contiguous: fast), one tap at a time (the
  memory stays that of the output, even for a large shrink with many taps)."""
  index, weight = bilinear_taps(tf.shape(image)[0], out_size)

  def add_tap(acc, tap):
    tap_index, tap_weight = tap
    return acc + tf.gather(image, tap_index, axis=0) * tap_weight[:, None, None]

  out_shape = tf.concat([[out_size], tf.shape(image)[1:]], axis=0)
  # Integer sums are exact in any order; Pillow starts from half a unit (rounding).
  acc = tf.foldl(
    add_tap,
    (tf.transpose(index), tf.transpose(weight)),
    initializer=tf.fill(out_shape, tf.constant(1 << (_PRECISION_BITS - 1), tf.int32)),
  )
  # An arithmetic shift floors, as Pillow's ``>>`` on a signed int.
  return tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)


def _resample_columns(image: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
  """The horizontal pass: (H, w, C) -> (H, out_size, C), as ``_resample_rows`` on the transpose."""
  return tf.transpose(_resample_rows(tf.transpose(image, [1, 0, 2]), out_size), [1, 0, 2])


def resize_bilinear(image: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  """PIL's ``Image.fromarray(image).resize((w, h), Image.BILINEAR)``, exactly.

  Args:
    image: (h, w, C) uint8.
    hw: (2,) int32, the output (height, width).
  Returns:
    (hw[0], hw[1], C) uint8; the input itself when the size is unchanged.
  """
  hw = tf.convert_to_tensor(hw, tf.int32)
  channels = image.shape[-1]
  pixels = tf.cast(image, tf.int32)
  old = tf.shape(image)[:2]
  horizontal = lambda x: tf.cond(old[1] != hw[1], lambda: _resample_columns(x, hw[1]), lambda: x)
  vertical = lambda x: tf.cond(old[0] != hw[0], lambda: _resample_rows(x, hw[0]), lambda: x)
  shrink_h, shrink_w = old[0] - hw[0], old[1] - hw[1]
  vertical_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
  pixels = tf.cond(
    vertical_first, lambda: horizontal(vertical(pixels)), lambda: vertical(horizontal(pixels))
  )
  out = tf.cast(pixels, tf.uint8)
  out.set_shape([None, None, channels])
  return out
