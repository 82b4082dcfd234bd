"""The built-in synthetic dataset: deterministic, COCO-format, learnable shapes with overlaps."""

import copy
import dataclasses
import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from conddetr_jax.data import coco, synthetic
from configs import default


def test_images_are_a_pure_function_of_seed_split_and_index():
  scenes = synthetic.Scenes(image_size=(64, 96))
  a_img, a_obj = synthetic.draw_image(0, 0, 5, scenes)
  b_img, b_obj = synthetic.draw_image(0, 0, 5, scenes)
  np.testing.assert_array_equal(a_img, b_img)
  assert a_obj == b_obj
  assert not np.array_equal(
    synthetic.draw_image(1, 0, 5, scenes)[0], synthetic.draw_image(0, 0, 5, scenes)[0]
  )
  assert not np.array_equal(
    synthetic.draw_image(0, 1, 5, scenes)[0], synthetic.draw_image(0, 0, 5, scenes)[0]
  )


def _draw_scenes(scenes: synthetic.Scenes, num_images: int = 60) -> tuple[list[int], int]:
  """Draws images, checks every box is the tight box of a shape inside its image, and returns the
  objects per image and the number of overlapping box pairs."""
  counts, overlaps = [], 0
  for index in range(num_images):
    image, objects = synthetic.draw_image(3, 0, index, scenes)
    h, w, _ = image.shape
    assert (
      scenes.image_size[0] <= h <= scenes.image_size[1]
      and scenes.image_size[0] <= w <= scenes.image_size[1]
    )
    counts.append(len(objects))
    boxes = np.array([o["bbox"] for o in objects])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w).all()
    assert (boxes[:, 1] + boxes[:, 3] <= h).all() and (boxes[:, 2:] >= 4).all()
    assert all(
      o["category_id"] in synthetic.CATEGORIES and 0 < o["area"] <= o["bbox"][2] * o["bbox"][3]
      for o in objects
    )
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    iw = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
    ih = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
    overlaps += int(((iw > 0) & (ih > 0)).sum() - len(objects)) // 2
  return counts, overlaps


def test_objects_are_tight_boxes_of_drawn_shapes_inside_the_image():
  counts, overlaps = _draw_scenes(synthetic.Scenes(image_size=(64, 96)))
  assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 3
  assert overlaps > 0  # realistic scenes: some boxes overlap


def test_max_objects_and_max_overlap_bound_every_image():
  counts, overlaps = _draw_scenes(
    synthetic.Scenes(image_size=(96, 128), max_objects=3, max_overlap=0.0)
  )
  assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) == 3
  assert overlaps == 0


def test_write_dataset_makes_the_original_coco_layout_once(tmp_path):
  root = str(tmp_path / "syn")
  scenes = synthetic.Scenes(image_size=(48, 64))
  assert synthetic.write_dataset(root, 12, 5, scenes, seed=1)
  for split, n in (("train", 12), ("val", 5)):
    ann = os.path.join(root, "annotations", f"instances_{split}2017.json")
    gt = COCO(ann)
    assert len(gt.getImgIds()) == n
    assert sorted(gt.getCatIds()) == [2, 5, 7, 9]  # non-contiguous ids
    for img in gt.loadImgs(gt.getImgIds()):
      with Image.open(os.path.join(root, f"{split}2017", img["file_name"])) as im:
        assert (im.height, im.width) == (img["height"], img["width"]) and im.format == "JPEG"
  with open(os.path.join(root, "annotations", "instances_train2017.json")) as f:
    before = f.read()
  assert not synthetic.write_dataset(root, 12, 5, scenes, seed=1)  # complete: untouched
  with open(os.path.join(root, "annotations", "instances_train2017.json")) as f:
    assert f.read() == before
  with pytest.raises(ValueError, match="already holds"):
    synthetic.write_dataset(root, 12, 5, scenes, seed=2)
  with pytest.raises(ValueError, match="already holds"):
    synthetic.write_dataset(root, 12, 5, dataclasses.replace(scenes, max_overlap=0.0), seed=1)


def test_train_and_val_differ(tmp_path):
  synthetic.write_dataset(str(tmp_path), 3, 3, synthetic.Scenes(image_size=(48, 48)), seed=0)
  train = np.asarray(Image.open(tmp_path / "train2017" / "000000000001.jpg"))
  val = np.asarray(Image.open(tmp_path / "val2017" / "000000000001.jpg"))
  assert not np.array_equal(train, val)
  with open(tmp_path / "annotations" / "instances_val2017.json") as f:
    assert json.load(f)["images"][0]["file_name"] == "000000000001.jpg"


def test_object_size_sets_the_side_of_every_object_relative_to_the_shorter_image_side():
  for index in range(20):
    image, objects = synthetic.draw_image(
      0, 0, index, synthetic.Scenes(image_size=(100, 140), object_size=(0.4, 0.5))
    )
    shorter = min(image.shape[:2])
    for o in objects:
      # The drawn side is in [0.4, 0.5] x shorter before an aspect jitter of at most 1.4 (a disc's
      # 1.25), clipped to the image; the tight box can only be smaller than the drawn one.
      assert max(o["bbox"][2:]) <= 0.5 * shorter * 1.4 + 1
      assert max(o["bbox"][2:]) >= 0.4 * shorter / 1.4 - 1
  with pytest.raises(ValueError, match=r"synthetic object size \(0.5, 0.2\)"):
    synthetic.write_dataset(
      "/nonexistent/never_written", 1, 1, synthetic.Scenes(object_size=(0.5, 0.2))
    )
  for bad, message in (
    ({"max_objects": 0}, "max_objects=0"),
    ({"max_overlap": 1.5}, "max_overlap=1.5"),
    ({"image_size": (64, 32)}, r"image size range \(64, 32\)"),
  ):
    with pytest.raises(ValueError, match=message):
      synthetic.write_dataset("/nonexistent/never_written", 1, 1, synthetic.Scenes(**bad))


def test_each_generation_parameter_gets_its_own_cache_folder():
  config = default.get_config()
  config.dataset.source = "synthetic"
  roots = {coco.default_generated_root(config)}
  for field, value in (
    ("synthetic_num_train", 7),
    ("synthetic_num_val", 7),
    ("synthetic_image_size", (64, 96)),
    ("synthetic_object_size", (0.2, 0.3)),
    ("synthetic_max_objects", 2),
    ("synthetic_max_overlap", 0.0),
    ("synthetic_seed", 3),
  ):
    changed = copy.deepcopy(config)
    changed.dataset[field] = value
    roots.add(coco.default_generated_root(changed))
  assert len(roots) == 8
