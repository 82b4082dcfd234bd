"""benchmarks/photo_padding.py's logic, without a model: which detections count as kept, the three
evaluation settings it compares, the scaled sizes and the photos it writes."""

import json

import numpy as np
from PIL import Image
import pytest

from benchmarks import photo_padding
from configs import r50


def detections(boxes, labels, image_ids=(1,)):
  """A ``gather_detections``-like dict of one image per row of ``boxes`` (N, K, 4)."""
  boxes = np.asarray(boxes, np.float32)
  return {
    "image_id": np.asarray(image_ids, np.int64),
    "scores": np.sort(np.random.default_rng(0).uniform(size=boxes.shape[:2]))[:, ::-1],
    "labels": np.asarray(labels, np.int32),
    "boxes": boxes,
  }


def ten_boxes():
  corner = np.arange(10, dtype=np.float32)[:, None] * 20
  return np.concatenate([corner, corner, corner + 50, corner + 30], axis=1)[None]


def test_a_detection_is_kept_with_its_label_and_every_coordinate_within_half_a_pixel():
  boxes, labels = ten_boxes(), np.arange(10)[None]
  reference = detections(boxes, labels)
  assert photo_padding.kept_shares(reference, reference).tolist() == [1.0]
  moved = boxes.copy()
  moved[0, 0, 2] += 0.4  # kept: within 0.5 px
  moved[0, 1, 3] -= 0.6  # lost: one coordinate 0.6 px away
  relabelled = labels.copy()
  relabelled[0, 2] = 77  # lost: another class
  other = detections(moved, relabelled)
  assert photo_padding.kept_shares(reference, other).tolist() == [pytest.approx(0.8)]


def test_the_order_within_the_top_10_does_not_matter_but_leaving_it_does():
  boxes, labels = ten_boxes(), np.arange(10)[None]
  reference = detections(boxes, labels)
  assert photo_padding.kept_shares(reference, detections(boxes[:, ::-1], labels[:, ::-1])) == [1.0]
  # Beyond the top 10: an 11th detection of the other run does not count.
  extra = np.concatenate([boxes[:, 1:], boxes[:, :1] + 100, boxes[:, :1]], axis=1)
  extra_labels = np.concatenate([labels[:, 1:], [[5]], labels[:, :1]], axis=1)
  assert photo_padding.kept_shares(reference, detections(extra, extra_labels)).tolist() == [
    pytest.approx(0.9)
  ]


def test_runs_of_different_images_are_not_compared():
  reference = detections(ten_boxes(), np.arange(10)[None])
  with pytest.raises(ValueError, match="different images"):
    photo_padding.kept_shares(reference, dict(reference, image_id=np.array([2])))


def test_the_reference_is_one_unpadded_image_per_device_and_never_is_the_original_s_padding():
  config = r50.get_config()
  runs = photo_padding.settings(config)
  assert list(runs) == ["alone", "defaults", "never"]
  alone, defaults, never = runs.values()
  assert alone.eval_per_device_batch_size == 1
  assert alone.dataset.size_divisibility == 1
  assert alone.dataset.eval_num_buckets == photo_padding.ALL_SIZES
  assert defaults is config and config.model.mask_padding == "eval"
  assert never.model.mask_padding == "never"
  assert never.eval_per_device_batch_size == config.eval_per_device_batch_size == 2


def test_scaling_scales_every_image_size_so_the_buckets_follow():
  ds = r50.get_config().dataset
  photo_padding.scale_sizes(ds, 0.5)
  assert (ds.eval_size, ds.eval_max_size, ds.train_max_size) == (400, 666, 666)
  assert ds.train_scales[0] == 240 and ds.train_scales[-1] == 400
  assert ds.crop_resize_scales == (200, 250, 300)


def test_the_photos_are_crops_of_their_sources_in_at_least_6_shapes(tmp_path, monkeypatch):
  source = tmp_path / "source.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(source)
  monkeypatch.setattr(photo_padding, "SOURCES", dict.fromkeys(photo_padding.SOURCES, str(source)))
  ann, image_dir = photo_padding.write_photos(str(tmp_path / "photos"))
  with open(ann) as f:
    images = json.load(f)["images"]
  assert len(images) == len(photo_padding.SHAPES)
  assert len({(i["width"], i["height"]) for i in images}) >= 6
  for image in images:
    with Image.open(f"{image_dir}/{image['file_name']}") as written:
      assert written.size == (image["width"], image["height"])
