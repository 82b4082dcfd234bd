"""The odd files and annotations of real datasets, each written by the test itself."""

import io
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from conddetr_jax import data
from conddetr_jax.data import coco, synthetic
from configs import default
from tests import processes

H, W = 48, 64
_YY, _XX = np.mgrid[0:H, 0:W]
PIXELS = np.stack([_XX * 4, _YY * 5, (_XX + _YY) * 2], axis=-1).astype(
  np.uint8
)  # smooth: JPEG-friendly


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


GOOD = encode(Image.fromarray(PIXELS), "JPEG", quality=95)
FILES = {
  "gray.jpg": encode(Image.fromarray(PIXELS).convert("L"), "JPEG", quality=95),
  "cmyk.jpg": encode(Image.fromarray(PIXELS).convert("CMYK"), "JPEG", quality=95),
  "progressive.jpg": encode(Image.fromarray(PIXELS), "JPEG", quality=95, progressive=True),
  "png_named.jpg": encode(Image.fromarray(PIXELS), "PNG"),
  "rgba.png": encode(Image.fromarray(PIXELS).convert("RGBA"), "PNG"),
  "truncated.jpg": GOOD[: len(GOOD) // 2],
  "wrong_size.jpg": encode(Image.fromarray(PIXELS[:40]), "JPEG"),
  "missing.jpg": None,
  "crowd_only.jpg": GOOD,
  "zero_box.jpg": GOOD,
  "many_boxes.jpg": GOOD,
  **{f"good{i}.jpg": GOOD for i in range(5)},
}
UNREADABLE = ("truncated.jpg", "wrong_size.jpg", "missing.jpg")
BOX = [8.0, 4.0, 16.0, 20.0]  # xywh


def annotations_of(name: str) -> list[dict]:
  if name == "crowd_only.jpg":
    return [{"bbox": BOX, "category_id": 3, "iscrowd": 1}]
  if name == "zero_box.jpg":
    return [
      {"bbox": [10.0, 10.0, 0.0, 5.0], "category_id": 3},  # zero width: dropped
      {"bbox": [30.0, 30.0, 5.0, -1.0], "category_id": 3},  # negative height: dropped
      {"bbox": [70.0, 10.0, 5.0, 5.0], "category_id": 3},  # outside the image: nothing left
      {"bbox": [56.0, 40.0, 20.0, 20.0], "category_id": 17},  # clipped to [56, 40, 64, 48]
      {"bbox": BOX, "category_id": 3},
    ]
  if name == "many_boxes.jpg":
    return [{"bbox": [2.0 * k, 2.0 * k, 10.0, 10.0], "category_id": 3} for k in range(5)]
  return [{"bbox": BOX, "category_id": 17}]


def write_split(root: str, split: str, names: list[str]) -> tuple[str, str]:
  image_dir = os.path.join(root, f"img_{split}")
  os.makedirs(image_dir, exist_ok=True)
  images, anns = [], []
  for image_id, name in enumerate(names, start=1):
    if FILES[name] is not None:
      with open(os.path.join(image_dir, name), "wb") as f:
        f.write(FILES[name])
    images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    for a in annotations_of(name):
      anns.append({"id": len(anns) + 1, "image_id": image_id, "area": 1.0, "iscrowd": 0, **a})
  ann_path = os.path.join(root, f"{split}.json")
  with open(ann_path, "w") as f:
    json.dump(
      {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 3, "name": "three"}, {"id": 17, "name": "seventeen"}],
      },
      f,
    )
  return ann_path, image_dir


def custom_config(root: str, train: list[str], val: list[str], **dataset):
  config = default.get_config()
  train_ann, train_images = write_split(root, "train", train)
  val_ann, val_images = write_split(root, "val", val)
  # eval_size = the shorter side and no flip: evaluation leaves the 48x64 images untouched.
  config.dataset.update(
    dict(
      source="coco",
      train_ann=train_ann,
      train_images=train_images,
      val_ann=val_ann,
      val_images=val_images,
      train_scales=(32, 48),
      train_max_size=64,
      crop_resize_scales=(40,),
      crop_min_size=24,
      crop_max_size=40,
      eval_size=48,
      eval_max_size=64,
      size_divisibility=16,
      num_parallel_calls=2,
    )
  )
  config.dataset.update(dataset)
  return config


READABLE = [n for n in FILES if n not in UNREADABLE]


def eval_by_name(config, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
  """Each example of the eval split, keyed by file name."""
  out = {}
  for batch in data.eval_iterator(config, global_batch_size=4, process_index=0, process_count=1):
    for i in np.flatnonzero(batch["valid"]):
      out[names[int(batch["image_id"][i]) - 1]] = {k: v[i] for k, v in batch.items()}
  return out


def test_every_format_decodes_to_rgb_of_the_listed_size(tmp_path):
  config = custom_config(str(tmp_path), READABLE, READABLE)
  examples = eval_by_name(config, READABLE)
  assert sorted(examples) == sorted(READABLE)
  std, mean = np.array([0.229, 0.224, 0.225]), np.array([0.485, 0.456, 0.406])
  for name, ex in examples.items():
    np.testing.assert_array_equal(ex["size"], [H, W])
    np.testing.assert_array_equal(ex["orig_size"], [H, W])
    pixels = (ex["image"][:H, :W] * std + mean) * 255
    if name == "gray.jpg":
      assert np.abs(pixels[..., 0] - pixels[..., 1]).max() < 0.01
    else:
      tolerance = 0.01 if name.endswith(("png", "png_named.jpg")) else 10  # JPEG is lossy
      assert np.abs(pixels - PIXELS).max() <= tolerance, name


def test_crowd_only_images_are_kept_without_boxes_and_bad_boxes_are_dropped_or_clipped(tmp_path):
  config = custom_config(str(tmp_path), READABLE, READABLE)
  examples = eval_by_name(config, READABLE)
  assert not examples["crowd_only.jpg"]["box_valid"].any()
  zero = examples["zero_box.jpg"]
  assert zero["box_valid"].sum() == 2
  cx, cy, w, h = zero["boxes"][zero["box_valid"]].T
  np.testing.assert_allclose(
    np.stack([(cx - w / 2) * W, (cy - h / 2) * H, w * W, h * H], -1),
    [[56, 40, 8, 8], BOX],
    atol=1e-4,
  )
  np.testing.assert_array_equal(zero["labels"][zero["box_valid"]], [17, 3])
  split = coco.load_split(config, "train")
  assert (
    split.box_start[-1] == sum(len(annotations_of(n)) for n in READABLE) - 1 - 3
  )  # crowd + 3 bad


def test_training_skips_unreadable_images_with_a_named_warning_and_a_count(tmp_path, caplog):
  names = READABLE + list(UNREADABLE)
  config = custom_config(str(tmp_path), names, READABLE)
  it = data.train_iterator(config, global_batch_size=4, process_index=0, process_count=1)
  steps = data.train_steps_per_epoch(config, 4)
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(steps)]
  assert it.num_skipped == len(UNREADABLE)
  for name in UNREADABLE:
    assert any(name in r.getMessage() and "Skipped" in r.getMessage() for r in caplog.records), name
  assert any("does not exist" in r.getMessage() for r in caplog.records)
  assert any("differs from the json" in r.getMessage() for r in caplog.records)
  assert any("so far" in r.getMessage() for r in caplog.records)
  seen = {names[i - 1] for b in batches for i in b["image_id"].tolist()}
  assert not seen & set(UNREADABLE)
  assert all(b["valid"].all() and b["image"].shape[0] == 4 for b in batches)


def test_training_with_strict_fails_naming_the_file(tmp_path):
  config = custom_config(str(tmp_path), READABLE + ["truncated.jpg"], READABLE, strict=True)
  it = data.train_iterator(config, global_batch_size=2, process_index=0, process_count=1)
  with pytest.raises(data.BadImageError, match=r"truncated\.jpg.*strict"):
    for _ in range(data.train_steps_per_epoch(config, 2)):
      next(it)


def test_evaluation_fails_on_an_undecodable_image_naming_it(tmp_path):
  config = custom_config(str(tmp_path), READABLE, READABLE + ["truncated.jpg"])
  with pytest.raises(data.BadImageError, match=r"truncated\.jpg"):
    list(data.eval_iterator(config, global_batch_size=4, process_index=0, process_count=1))


def test_evaluation_fails_on_a_missing_image_naming_it(tmp_path):
  config = custom_config(str(tmp_path), READABLE, READABLE + ["missing.jpg"])
  with pytest.raises(data.BadImageError, match=r"missing\.jpg.*does not exist"):
    data.eval_iterator(config, global_batch_size=4, process_index=0, process_count=1)


def test_images_with_more_than_max_boxes_keep_max_boxes_and_are_counted(tmp_path, caplog):
  config = custom_config(str(tmp_path), READABLE, ["many_boxes.jpg", "good0.jpg"], max_boxes=3)
  it = data.eval_iterator(config, global_batch_size=2, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    batch = next(it)
  assert batch["box_valid"].shape == (2, 3)
  np.testing.assert_array_equal(batch["box_valid"].sum(1), [3, 1])
  np.testing.assert_allclose(
    batch["boxes"][0, :, 0] * W, [5, 7, 9], atol=1e-4
  )  # the first three kept
  assert it.num_truncated == 1 and any("many_boxes.jpg" in r.getMessage() for r in caplog.records)


def test_missing_annotation_file_names_the_path_and_the_layout(tmp_path):
  config = default.get_config()
  config.dataset.root = str(tmp_path)
  with pytest.raises(
    FileNotFoundError, match=r"instances_train2017\.json(.|\n)*Expected the COCO 2017 layout"
  ):
    data.prepare_dataset(config)


def test_missing_image_folder_names_the_path_and_the_layout(tmp_path):
  os.makedirs(tmp_path / "annotations")
  for split in ("train", "val"):
    (tmp_path / "annotations" / f"instances_{split}2017.json").write_text("{}")
  config = default.get_config()
  config.dataset.root = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"train2017(.|\n)*ROOT/images/train2017"):
    data.prepare_dataset(config)


def test_images_subfolder_layout_is_accepted(tmp_path):
  root = tmp_path / "root"
  for split in ("train", "val"):
    ann_path, image_dir = write_split(str(tmp_path / split), split, ["good0.jpg"])
    os.renames(image_dir, root / "images" / f"{split}2017")
    os.renames(ann_path, root / "annotations" / f"instances_{split}2017.json")
  config = default.get_config()
  config.dataset.root = str(root)
  data.prepare_dataset(config)
  assert coco.resolve_split(config, "train")[1] == str(root / "images" / "train2017")
  assert len(coco.load_split(config, "train")) == 1


def test_custom_dataset_needs_both_json_and_folder(tmp_path):
  config = default.get_config()
  config.dataset.train_ann = str(tmp_path / "x.json")
  with pytest.raises(ValueError, match="train_images"):
    coco.resolve_split(config, "train")


def test_an_image_folder_without_any_listed_image_is_an_error(tmp_path):
  config = custom_config(str(tmp_path), ["good0.jpg"], ["good0.jpg"])
  os.remove(os.path.join(config.dataset.train_images, "good0.jpg"))
  with pytest.raises(FileNotFoundError, match="None of the 1 images"):
    coco.load_split(config, "train")


def test_training_stops_in_one_line_naming_a_category_id_beyond_num_classes(tmp_path):
  root = str(tmp_path / "shapes")
  synthetic.write_dataset(root, num_train=4, num_val=2)
  train_json = os.path.join(root, "annotations", "instances_train2017.json")
  with open(train_json) as f:
    content = json.load(f)
  content["categories"].append(
    {"id": 12, "name": "star", "supercategory": "shape"}
  )  # test_tiny: 10 classes
  content["annotations"][0]["category_id"] = 12
  with open(train_json, "w") as f:
    json.dump(content, f)
  workdir = tmp_path / "run"
  proc = processes.run_python(
    "train.py",
    "--config=configs/test_tiny.py",
    f"--workdir={workdir}",
    "--config.dataset.source=coco",
    f"--config.dataset.root={root}",
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: the largest category id of {train_json} is 12, but config.model.num_classes=10: "
    "set --config.model.num_classes=13 (the largest id + 1)"
  )
  assert not (workdir / "checkpoints").exists()  # stopped before the model was built
