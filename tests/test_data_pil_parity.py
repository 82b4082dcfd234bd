"""The model sees the original's pixels: on a real photograph (matplotlib's sample JPEG) saved in
the variants real datasets hold, the evaluation pipeline's tensor and predict.py's input equal
PIL decode + ``convert('RGB')`` + PIL bilinear resize + torch's ToTensor/Normalize (the
original's val transform) to float32 rounding; the train transforms equal PIL's flip, resize,
crop, resize with the same geometry, pixel for pixel."""

import io
import json
import os

import matplotlib.cbook
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import torch

from conddetr_jax import data
from conddetr_jax.data import image_files, pil_resample, transforms
from configs import default
from tests.test_data_transforms import original_size

EVAL_SIZE, EVAL_MAX_SIZE = 96, 160  # small, for speed: 600x512 shrinks; the small crop enlarges


def _photo() -> Image.Image:
  with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as f:
    return f.convert("RGB")  # 600 x 512


def _cmyk_with_black(rgb: Image.Image) -> Image.Image:
  """A CMYK image that uses its K channel (PIL's own RGB -> CMYK leaves K at 0)."""
  c = 255 - np.asarray(rgb, np.int32)
  k = c.min(axis=-1, keepdims=True)
  return Image.fromarray(np.concatenate([c - k, k], -1).astype(np.uint8), "CMYK")


def _rgba(rgb: Image.Image) -> Image.Image:
  pixels = np.asarray(rgb.convert("RGBA")).copy()
  pixels[..., 3] = np.arange(pixels.shape[1]) % 256  # alpha that varies: convert('RGB') drops it
  return Image.fromarray(pixels, "RGBA")


def _variants() -> dict[str, tuple[Image.Image, str, dict]]:
  photo = _photo()
  return {
    "jpeg-q50": (photo, "JPEG", dict(quality=50)),
    "jpeg-q75": (photo, "JPEG", dict(quality=75)),
    "jpeg-q95": (photo, "JPEG", dict(quality=95)),
    "jpeg-444": (photo, "JPEG", dict(quality=90, subsampling=0)),
    "progressive": (photo, "JPEG", dict(quality=85, progressive=True)),
    "grayscale": (photo.convert("L"), "JPEG", dict(quality=85)),
    "cmyk": (_cmyk_with_black(photo), "JPEG", dict(quality=90)),
    "rgba-png": (_rgba(photo), "PNG", {}),
    "small-enlarged": (photo.crop((200, 150, 290, 220)), "JPEG", dict(quality=90)),  # 70 x 90
    "tall": (
      photo.crop((100, 0, 300, 600)),
      "JPEG",
      dict(quality=90),
    ),  # 600 x 200: vertical pass first
  }


def original_eval_input(path: str) -> np.ndarray:
  """The original's val transform of a file: (h, w, 3) float32, channels last."""
  with Image.open(path) as f:
    image = f.convert("RGB")
  out_h, out_w = original_size(image.height, image.width, EVAL_SIZE, EVAL_MAX_SIZE)
  if (out_h, out_w) != (image.height, image.width):
    image = image.resize((out_w, out_h), Image.BILINEAR)
  tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)  # ToTensor
  mean, std = torch.tensor(transforms.IMAGENET_MEAN), torch.tensor(transforms.IMAGENET_STD)
  tensor = (tensor - mean[:, None, None]) / std[:, None, None]  # Normalize
  return tensor.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory):
  """A COCO-style split of the variants; returns (config, {image id: path})."""
  root = tmp_path_factory.mktemp("photos")
  images, paths = [], {}
  for i, (name, (image, fmt, options)) in enumerate(_variants().items(), start=1):
    file_name = f"{name}.{fmt.lower()}"
    image.save(root / file_name, fmt, **options)
    images.append({"id": i, "file_name": file_name, "height": image.height, "width": image.width})
    paths[i] = str(root / file_name)
  ann = {
    "images": images,
    "categories": [{"id": 1, "name": "person"}],
    "annotations": [
      {
        "id": i,
        "image_id": i,
        "category_id": 1,
        "bbox": [10, 10, 30, 40],
        "area": 1200,
        "iscrowd": 0,
      }
      for i in paths
    ],
  }
  with open(root / "instances.json", "w") as f:
    json.dump(ann, f)
  config = default.get_config()
  config.dataset.update(
    dict(
      source="coco",
      train_ann=str(root / "instances.json"),
      train_images=str(root),
      val_ann=str(root / "instances.json"),
      val_images=str(root),
      train_scales=(80, 96),
      train_max_size=EVAL_MAX_SIZE,
      crop_resize_scales=(90,),
      crop_min_size=40,
      crop_max_size=80,
      eval_size=EVAL_SIZE,
      eval_max_size=EVAL_MAX_SIZE,
      size_divisibility=32,
      num_buckets=3,
      num_parallel_calls=1,
    )
  )
  return config, paths


def test_evaluation_input_equals_the_originals(photo_dataset):
  config, paths = photo_dataset
  seen = set()
  for batch in data.eval_iterator(config, global_batch_size=2, process_index=0, process_count=1):
    for k in np.flatnonzero(batch["valid"]):
      image_id = int(batch["image_id"][k])
      h, w = batch["size"][k]
      expected = original_eval_input(paths[image_id])
      assert (h, w) == expected.shape[:2], os.path.basename(paths[image_id])
      np.testing.assert_allclose(
        batch["image"][k, :h, :w],
        expected,
        atol=1e-5,
        rtol=0,
        err_msg=os.path.basename(paths[image_id]),
      )
      assert (
        not batch["pad_mask"][k, :h, :w].any()
        and batch["pad_mask"][k].sum() == batch["pad_mask"][k].size - h * w
      )
      seen.add(image_id)
  assert seen == set(paths)


def test_predict_input_equals_the_originals(photo_dataset):
  config, paths = photo_dataset
  for path in paths.values():
    loaded = image_files.load_image(path, config)
    expected = original_eval_input(path)
    h, w = expected.shape[:2]
    np.testing.assert_allclose(
      loaded.image[0, :h, :w], expected, atol=1e-5, rtol=0, err_msg=os.path.basename(path)
    )
    assert not loaded.pad_mask[0, :h, :w].any()


def original_train_image(image: Image.Image, geometry: np.ndarray) -> np.ndarray:
  """The original's train transforms with a given geometry, on a PIL image: hflip, resize, crop,
  resize (each resize to 8 bits, as on PIL images). (out_h, out_w, 3) uint8."""
  flip, mid_h, mid_w, top, left, crop_h, crop_w, out_h, out_w = (int(v) for v in geometry)
  if flip:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  if (mid_h, mid_w) != (image.height, image.width):
    image = image.resize((mid_w, mid_h), Image.BILINEAR)
  image = image.crop((left, top, left + crop_w, top + crop_h))
  if (out_h, out_w) != (crop_h, crop_w):
    image = image.resize((out_w, out_h), Image.BILINEAR)
  return np.asarray(image)


def test_train_transforms_equal_the_originals_with_the_same_geometry(photo_dataset):
  config, _ = photo_dataset
  photo = _photo()
  geometries = transforms.train_geometry(
    np.random.default_rng(3), np.array([[photo.height, photo.width]] * 8), config.dataset
  )
  assert (
    len(set(geometries[:, 1].tolist())) > 1 and (geometries[:, 5] < geometries[:, 1]).any()
  )  # both branches
  pixels = tf.constant(np.asarray(photo))
  no_boxes, no_labels = tf.zeros([0, 4]), tf.zeros([0], tf.int32)
  for geometry in geometries:
    ours, _, _ = transforms.apply_geometry(pixels, no_boxes, no_labels, tf.constant(geometry))
    np.testing.assert_array_equal(
      ours.numpy(), original_train_image(photo, geometry), err_msg=str(geometry)
    )


@pytest.mark.parametrize("size", [(600, 512), (37, 1), (1, 45), (13, 13)])
def test_resize_equals_pil_on_many_shapes(size):
  """Random pixels, random output sizes (shrink, enlarge, mixed, one side kept)."""
  rng = np.random.default_rng(size[0] * 1000 + size[1])
  pixels = rng.integers(0, 256, size=(*size, 3)).astype(np.uint8)
  for _ in range(6):
    out_h, out_w = (int(v) for v in rng.integers(1, 2 * np.array(size) + 8))
    out_h = size[0] if rng.random() < 0.2 else out_h
    ours = pil_resample.resize_bilinear(tf.constant(pixels), tf.constant([out_h, out_w])).numpy()
    pil = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BILINEAR))
    np.testing.assert_array_equal(ours, pil, err_msg=f"{size} -> {(out_h, out_w)}")


def test_fast_train_images_are_pils_single_resize_of_the_window_in_source_pixels(photo_dataset):
  """train_resize="fast": the recipe's crop window taken back to the photo's pixels, resized once
  in float, equals PIL's one bilinear resize of that window to a grey level (inside a 2-pixel
  border, where PIL also reads pixels beyond the window and the fast path, which decodes only the
  window, does not), whether the output grows or shrinks."""
  del photo_dataset
  photo = _photo()
  sizes = np.array([[photo.height, photo.width]] * 8)
  ds = (
    default.get_config().dataset
  )  # the original's crop; outputs that shrink and grow the 600x512 photo
  ds.train_scales = (240, 800)
  geometries = transforms.in_source_pixels(
    transforms.train_geometry(np.random.default_rng(3), sizes, ds), sizes
  )
  crops = (geometries[:, 5] < photo.height) | (geometries[:, 6] < photo.width)
  shrinks = (geometries[:, 7] < geometries[:, 5]) | (geometries[:, 8] < geometries[:, 6])
  assert crops.any() and (~crops).any() and shrinks.any() and (~shrinks).any()
  pixels = tf.constant(np.asarray(photo))
  mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
  for geometry in geometries:
    flip, _, _, top, left, crop_h, crop_w, out_h, out_w = geometry
    t, l, h, w = transforms.unflipped_window(tf.constant(geometry), photo.width).numpy()
    ours = transforms.fast_train_image(pixels[t : t + h, l : l + w], tf.constant(geometry)).numpy()
    image = photo.transpose(Image.FLIP_LEFT_RIGHT) if flip else photo
    pil = np.asarray(
      image.resize((out_w, out_h), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    )
    grey = (ours * std + mean) * 255
    np.testing.assert_allclose(grey[2:-2, 2:-2], pil[2:-2, 2:-2], atol=1.01, err_msg=str(geometry))
