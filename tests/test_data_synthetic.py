"""The built-in synthetic dataset: deterministic, COCO-format, learnable shapes with overlaps."""

import json
import os

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from conddetr_jax.data import synthetic


def test_images_are_a_pure_function_of_seed_split_and_index():
  a_img, a_obj = synthetic.draw_image(0, 0, 5, (64, 96))
  b_img, b_obj = synthetic.draw_image(0, 0, 5, (64, 96))
  np.testing.assert_array_equal(a_img, b_img)
  assert a_obj == b_obj
  assert not np.array_equal(synthetic.draw_image(1, 0, 5, (64, 64))[0], synthetic.draw_image(0, 0, 5, (64, 64))[0])
  assert not np.array_equal(synthetic.draw_image(0, 1, 5, (64, 64))[0], synthetic.draw_image(0, 0, 5, (64, 64))[0])


def test_objects_are_tight_boxes_of_drawn_shapes_inside_the_image():
  counts, overlaps = [], 0
  for index in range(60):
    image, objects = synthetic.draw_image(3, 0, index, (64, 96))
    h, w, _ = image.shape
    assert 64 <= h <= 96 and 64 <= w <= 96
    counts.append(len(objects))
    boxes = np.array([o["bbox"] for o in objects])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w).all()
    assert (boxes[:, 1] + boxes[:, 3] <= h).all() and (boxes[:, 2:] >= 4).all()
    assert all(o["category_id"] in synthetic.CATEGORIES and 0 < o["area"] <= o["bbox"][2] * o["bbox"][3]
               for o in objects)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    iw = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
    ih = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
    overlaps += int(((iw > 0) & (ih > 0)).sum() - len(objects)) // 2
  assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 3
  assert overlaps > 0  # realistic scenes: some boxes overlap


def test_write_dataset_makes_the_original_coco_layout_once(tmp_path):
  root = str(tmp_path / "syn")
  assert synthetic.write_dataset(root, 12, 5, (48, 64), seed=1)
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
  assert not synthetic.write_dataset(root, 12, 5, (48, 64), seed=1)  # complete: untouched
  with open(os.path.join(root, "annotations", "instances_train2017.json")) as f:
    assert f.read() == before
  with pytest.raises(ValueError, match="already holds"):
    synthetic.write_dataset(root, 12, 5, (48, 64), seed=2)


def test_train_and_val_differ(tmp_path):
  synthetic.write_dataset(str(tmp_path), 3, 3, (48, 48), seed=0)
  train = np.asarray(Image.open(tmp_path / "train2017" / "000000000001.jpg"))
  val = np.asarray(Image.open(tmp_path / "val2017" / "000000000001.jpg"))
  assert not np.array_equal(train, val)
  with open(tmp_path / "annotations" / "instances_val2017.json") as f:
    assert json.load(f)["images"][0]["file_name"] == "000000000001.jpg"


def test_object_size_sets_the_side_of_every_object_relative_to_the_shorter_image_side():
  for index in range(20):
    image, objects = synthetic.draw_image(0, 0, index, (100, 140), object_size=(0.4, 0.5))
    shorter = min(image.shape[:2])
    for o in objects:
      # The drawn side is in [0.4, 0.5] x shorter before an aspect jitter of at most 1.4 (a disc's
      # 1.25), clipped to the image; the tight box can only be smaller than the drawn one.
      assert max(o["bbox"][2:]) <= 0.5 * shorter * 1.4 + 1
      assert max(o["bbox"][2:]) >= 0.4 * shorter / 1.4 - 1
  with pytest.raises(ValueError, match=r"synthetic object size \(0.5, 0.2\)"):
    synthetic.write_dataset("/nonexistent/never_written", 1, 1, object_size=(0.5, 0.2))
