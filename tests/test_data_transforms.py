"""DETR transforms: sizes as the original's get_size_with_aspect_ratio, boxes through every op
(checked against hand-computed values), decoding of the odd files real datasets contain."""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from conddetr_jax.data import transforms
from configs import default


def original_size(h, w, size, max_size=None):
  """The original's get_size_with_aspect_ratio, transcribed with Python scalars (the reference)."""
  if max_size is not None:
    min_original_size = float(min((w, h)))
    max_original_size = float(max((w, h)))
    if max_original_size / min_original_size * size > max_size:
      size = int(round(max_size * min_original_size / max_original_size))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    return int(size * h / w), size
  return size, int(size * w / h)


@pytest.mark.parametrize(
  "hw, size, max_size, expected",
  [
    ((480, 640), 800, 1333, (800, 1066)),  # 640/480*800 = 1066.67, truncated
    ((640, 480), 800, 1333, (1066, 800)),  # portrait
    ((427, 640), 800, 1333, (800, 1199)),
    ((480, 640), 1100, 1333, (1000, 1333)),  # capped: round(1333*480/640 = 999.75) = 1000
    ((800, 1000), 800, 1333, (800, 1000)),  # shorter side already the target: unchanged
    ((2666, 3), 800, 1333, (1777, 2)),  # round(1.5) = 2, half to even as Python's round
    ((2666, 5), 800, 1333, (1066, 2)),  # round(2.5) = 2
    ((300, 500), 400, None, (400, 666)),  # no cap (the crop branch's first resize)
  ],
)
def test_resized_size_matches_hand_computed_values(hw, size, max_size, expected):
  oh, ow = transforms.resized_size(np.array([hw[0]]), np.array([hw[1]]), size, max_size)
  assert (int(oh[0]), int(ow[0])) == expected
  assert original_size(*hw, size, max_size) == expected


def test_resized_size_matches_the_original_on_random_sizes():
  rng = np.random.default_rng(0)
  h, w = rng.integers(20, 2000, size=(2, 3000))
  size = rng.choice([480, 512, 800], size=3000)
  oh, ow = transforms.resized_size(h, w, size, 1333)
  expected = np.array([original_size(int(a), int(b), int(s), 1333) for a, b, s in zip(h, w, size)])
  np.testing.assert_array_equal(np.stack([oh, ow], -1), expected)


def _dataset_config(**overrides) -> ml_collections.ConfigDict:
  """The original recipe's sizes (configs/default.py) with three of its train scales, then
  ``overrides``."""
  dataset = default.get_config().dataset
  dataset.train_scales = (480, 512, 800)
  dataset.update(overrides)
  return dataset


def test_train_geometry_follows_the_original_recipe():
  ds = _dataset_config()
  rng = np.random.default_rng(1)
  sizes = rng.integers(300, 900, size=(2000, 2))
  g = transforms.train_geometry(np.random.default_rng(2), sizes, ds)
  flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w = g.T
  assert 0.4 < flip.mean() < 0.6
  plain = (
    (top == 0)
    & (left == 0)
    & (crop_h == mid_h)
    & (crop_w == mid_w)
    & (out_h == mid_h)
    & (out_w == mid_w)
  )
  assert 0.4 < plain.mean() < 0.6
  # Plain branch: one resize of the original with a train scale and the cap.
  for i in np.flatnonzero(plain)[:200]:
    assert any(original_size(*sizes[i], s, 1333) == (out_h[i], out_w[i]) for s in ds.train_scales)
  # Crop branch: resize without cap, crop within [384, 600] and inside the image, resize with cap.
  crop = ~plain
  for i in np.flatnonzero(crop)[:200]:
    assert any(original_size(*sizes[i], s) == (mid_h[i], mid_w[i]) for s in ds.crop_resize_scales)
    assert 384 <= crop_h[i] <= min(600, mid_h[i]) and 384 <= crop_w[i] <= min(600, mid_w[i])
    assert 0 <= top[i] <= mid_h[i] - crop_h[i] and 0 <= left[i] <= mid_w[i] - crop_w[i]
    assert any(
      original_size(crop_h[i], crop_w[i], s, 1333) == (out_h[i], out_w[i]) for s in ds.train_scales
    )


def test_train_geometry_is_a_function_of_the_generator_state():
  sizes = np.array([[480, 640], [640, 427], [500, 500]])
  a = transforms.train_geometry(np.random.default_rng(7), sizes, _dataset_config())
  b = transforms.train_geometry(np.random.default_rng(7), sizes, _dataset_config())
  np.testing.assert_array_equal(a, b)


def test_crop_side_is_clamped_for_images_smaller_than_the_crop_minimum():
  # 50x50 images resized to 40x40 before a crop of at least 64 (which the original cannot do).
  g = transforms.train_geometry(
    np.random.default_rng(0),
    np.full((200, 2), 50),
    _dataset_config(crop_resize_scales=(40,), crop_min_size=64, crop_max_size=90),
  )
  crop_branch = g[:, 1] == 40
  assert crop_branch.any()
  np.testing.assert_array_equal(
    g[crop_branch, 3:7], np.tile([0, 0, 40, 40], (crop_branch.sum(), 1))
  )


def test_eval_geometry_is_the_original_eval_resize():
  g = transforms.eval_geometry(np.array([[480, 640], [640, 480], [300, 1200]]), _dataset_config())
  np.testing.assert_array_equal(g[:, 7:], [[800, 1066], [1066, 800], [333, 1332]])
  assert (g[:, 0] == 0).all() and (g[:, 3:5] == 0).all()


def test_limit_output_size_shrinks_only_oversized_outputs():
  g = np.zeros((2, 9), np.int32)
  g[:, 7:] = [[1340, 300], [800, 1066]]
  out = transforms.limit_output_size(g, 1333)
  np.testing.assert_array_equal(out[:, 7:], [[1333, 298], [800, 1066]])


def transform(
  mode: str, image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, geometry: tf.Tensor
) -> tuple[np.ndarray, tf.Tensor, tf.Tensor]:
  """One geometry applied as ``config.dataset.train_resize=mode`` applies it: the output in grey
  levels (the fast path's normalised floats mapped back), its boxes and labels."""
  if mode == "pil":
    out, boxes, labels = transforms.apply_geometry(image, boxes, labels, geometry)
    return out.numpy().astype(np.float64), boxes, labels
  source = transforms.in_source_pixels(geometry.numpy()[None], np.array([image.shape[:2]]))[0]
  t, l, h, w = transforms.unflipped_window(tf.constant(source), image.shape[1]).numpy()
  out = transforms.fast_train_image(image[t : t + h, l : l + w], tf.constant(source)).numpy()
  boxes, labels = transforms.geometry_boxes(
    boxes, labels, tf.constant(source), tf.constant(source[1:3])
  )
  return (out * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255, boxes, labels


@pytest.mark.parametrize("mode", transforms.TRAIN_RESIZE_MODES)
def test_boxes_through_flip_resize_crop_resize_match_hand_computed_values(mode):
  image = tf.zeros([100, 200, 3], tf.uint8)
  boxes = tf.constant(
    [
      [10.0, 20.0, 50.0, 60.0],  # survives the crop
      [100.0, 80.0, 120.0, 100.0],
    ]
  )  # ends up left of the crop window: dropped
  labels = tf.constant([3, 7], tf.int32)
  # flip; resize to (50, 100); crop top=5 left=80 h=40 w=20; resize to (80, 40).
  geometry = tf.constant([1, 50, 100, 5, 80, 40, 20, 80, 40], tf.int32)
  out_image, out_boxes, out_labels = transform(mode, image, boxes, labels, geometry)
  assert out_image.shape == (80, 40, 3)
  # Box 1: flip -> [150, 20, 190, 60]; x0.5 -> [75, 10, 95, 30]; crop -> [0, 5, 15, 25]; x2 -> [0,
  # 10, 30, 50].
  np.testing.assert_allclose(out_boxes.numpy(), [[0.0, 10.0, 30.0, 50.0]], atol=1e-5)
  np.testing.assert_array_equal(out_labels.numpy(), [3])
  # Normalised cxcywh of the (80, 40) output: (15/40, 30/80, 30/40, 40/80).
  np.testing.assert_allclose(
    transforms.normalized_cxcywh(out_boxes, tf.constant([80, 40])).numpy(),
    [[0.375, 0.375, 0.75, 0.5]],
    atol=1e-6,
  )


def test_individual_box_ops():
  boxes = tf.constant([[10.0, 20.0, 50.0, 60.0]])
  np.testing.assert_allclose(
    transforms.hflip_boxes(boxes, tf.constant(200)).numpy(), [[150.0, 20.0, 190.0, 60.0]]
  )
  np.testing.assert_allclose(
    transforms.resize_boxes(boxes, tf.constant([100, 200]), tf.constant([300, 100])),
    [[5.0, 60.0, 25.0, 180.0]],
  )
  cropped, keep = transforms.crop_boxes(
    tf.constant([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.0, 5.0], [40.0, 30.0, 45.0, 90.0]]),
    tf.constant(25),
    tf.constant(8),
    tf.constant(30),
    tf.constant(40),
  )
  # Shift by (8, 25), clip to 40 x 30: the second box has no area left, the third is clipped.
  np.testing.assert_allclose(
    cropped.numpy(), [[2.0, 0.0, 40.0, 30.0], [0.0, 0.0, 0.0, 0.0], [32.0, 5.0, 37.0, 30.0]]
  )
  np.testing.assert_array_equal(keep.numpy(), [True, False, True])


@pytest.mark.parametrize("mode", transforms.TRAIN_RESIZE_MODES)
def test_flip_mirrors_pixels_and_boxes_together(mode):
  pixels = np.zeros((20, 30, 3), np.uint8)
  pixels[5:10, 2:8] = 255  # a white box at x in [2, 8), y in [5, 10)
  geometry = tf.constant([1, 20, 30, 0, 0, 20, 30, 20, 30], tf.int32)
  image, boxes, _ = transform(
    mode, tf.constant(pixels), tf.constant([[2.0, 5.0, 8.0, 10.0]]), tf.constant([1]), geometry
  )
  image = np.round(image)  # the fast path's floats: grey levels to float32 rounding
  x1, y1, x2, y2 = boxes.numpy()[0].astype(int)
  np.testing.assert_array_equal((x1, y1, x2, y2), (22, 5, 28, 10))
  inside = image[y1:y2, x1:x2]
  assert (inside == 255).all() and image.sum() == inside.sum()


def test_in_source_pixels_takes_the_crop_window_back_through_the_first_resize():
  geometry = np.array(
    [
      [1, 50, 100, 5, 80, 40, 20, 80, 40],  # the crop branch at half size
      [0, 30, 40, 1, 3, 20, 21, 60, 63],  # 1/3.5 size: edges rounded
      [1, 70, 140, 0, 0, 70, 140, 70, 140],
    ]
  )  # the plain branch: the whole image
  sizes = np.array([[100, 200], [105, 140], [100, 200]])
  np.testing.assert_array_equal(
    transforms.in_source_pixels(geometry, sizes),
    [
      [1, 100, 200, 10, 160, 80, 40, 80, 40],
      [
        0,
        105,
        140,
        4,
        10,
        70,
        74,
        60,
        63,
      ],  # rows [3.5, 73.5) -> [4, 74); columns [10.5, 84) -> [10, 84)
      [1, 100, 200, 0, 0, 100, 200, 70, 140],
    ],
  )
  # The fast path decodes the window of the unflipped image.
  np.testing.assert_array_equal(
    transforms.unflipped_window(
      tf.constant([1, 100, 200, 10, 160, 80, 40, 80, 40]), tf.constant(200)
    ).numpy(),
    [10, 0, 80, 40],
  )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_window_is_the_window_of_pils_pixels(fmt):
  pixels = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3)).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  window, hw = transforms.decode_window(
    tf.constant(buffer.getvalue()), tf.constant([3, 17, 21, 30])
  )
  with Image.open(buffer) as image:
    pil = np.asarray(image.convert("RGB"))[3:24, 17:47]
  assert window.shape == (21, 30, 3)
  # A JPEG window's 2-pixel edge may differ: chroma upsampling there lacks the pixels outside.
  np.testing.assert_array_equal(window.numpy()[2:-2, 2:-2], pil[2:-2, 2:-2])
  np.testing.assert_array_equal(hw.numpy(), [40, 56])


def test_fast_path_pixels_stay_where_its_boxes_say():
  """A white rectangle through random geometries of both branches: on the fast path, the bright
  pixels of the output fill the transformed box to the pixel."""
  pixels = np.zeros((120, 160, 3), np.uint8)
  pixels[30:70, 50:110] = 255
  box = tf.constant([[50.0, 30.0, 110.0, 70.0]])
  ds = _dataset_config(
    train_scales=(96, 128, 160),
    crop_resize_scales=(90, 120),
    crop_min_size=40,
    crop_max_size=100,
    train_max_size=400,
  )
  geometries = transforms.train_geometry(np.random.default_rng(5), np.array([[120, 160]] * 12), ds)
  assert (geometries[:, 0] == 1).any() and (geometries[:, 5] < geometries[:, 1]).any()
  for geometry in geometries:
    image, boxes, _ = transform(
      "fast", tf.constant(pixels), box, tf.constant([1]), tf.constant(geometry)
    )
    bright = np.argwhere(image[..., 0] > 127.5)
    if not len(boxes):
      assert not len(bright), geometry
      continue
    x1, y1, x2, y2 = boxes.numpy()[0]
    np.testing.assert_allclose(
      [*bright.min(0), *(bright.max(0) + 1)], [y1, x1, y2, x2], atol=0.5, err_msg=str(geometry)
    )


def test_resize_is_identity_when_the_size_is_unchanged():
  pixels = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3)).astype(np.uint8)
  np.testing.assert_array_equal(
    transforms.resize_image(tf.constant(pixels), tf.constant([7, 9])).numpy(), pixels
  )


@pytest.mark.parametrize(
  "hw",
  [(100, 130), (30, 40), (60, 30), (20, 60)],
  ids=["enlarge", "shrink", "mixed", "height-shrinks-most"],
)
def test_resize_matches_pil_bilinear_as_used_by_the_original(hw):
  pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3)).astype(np.uint8)
  ours = transforms.resize_image(tf.constant(pixels), tf.constant(hw)).numpy()
  pil = np.asarray(Image.fromarray(pixels).resize(hw[::-1], Image.BILINEAR))
  np.testing.assert_array_equal(ours, pil)


def test_normalize_image_uses_imagenet_statistics():
  out = transforms.normalize_image(tf.fill([1, 1, 3], tf.constant(255, tf.uint8))).numpy()[0, 0]
  np.testing.assert_allclose(
    out, (1 - np.array(transforms.IMAGENET_MEAN)) / np.array(transforms.IMAGENET_STD), rtol=1e-5
  )


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


_YY, _XX = np.mgrid[0:24, 0:32]
RGB = np.stack([_XX * 8, _YY * 10, (_XX + _YY) * 4], axis=-1).astype(np.uint8)
# CMYK with a black channel (PIL's RGB -> CMYK leaves K at 0, which hides rounding differences).
CMYK = np.concatenate(
  [np.broadcast_to(RGB[..., :1], RGB.shape), (_XX * _YY % 256)[..., None]], -1
).astype(np.uint8)


@pytest.mark.parametrize(
  "data",
  [
    _encode(Image.fromarray(RGB), "JPEG", quality=95),
    _encode(Image.fromarray(RGB).convert("L"), "JPEG", quality=95),
    _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95),
    _encode(Image.fromarray(CMYK, "CMYK"), "JPEG", quality=95),
    _encode(Image.fromarray(RGB), "JPEG", progressive=True, quality=95),
    _encode(Image.fromarray(RGB).convert("RGBA"), "PNG"),
    _encode(Image.fromarray(RGB).convert("P"), "PNG"),
  ],
  ids=[
    "rgb-jpeg",
    "grayscale-jpeg",
    "cmyk-jpeg",
    "cmyk-black-jpeg",
    "progressive-jpeg",
    "rgba-png",
    "palette-png",
  ],
)
def test_decode_gives_the_pixels_of_pil_convert_rgb(data):
  decoded = transforms.decode_image(tf.constant(data)).numpy()
  expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  assert decoded.shape == (24, 32, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, expected)


def test_cmyk_jpeg_decodes_to_the_original_colours():
  data = _encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95)
  decoded = transforms.decode_image(tf.constant(data)).numpy()
  assert np.abs(decoded.astype(int) - RGB).max() <= 6


def test_decode_rejects_truncated_jpeg():
  data = _encode(Image.fromarray(RGB), "JPEG")
  with pytest.raises(tf.errors.InvalidArgumentError):
    transforms.decode_image(tf.constant(data[: len(data) // 2]))
