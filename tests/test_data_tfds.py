"""The tfds source: a prepared TFDS dataset with coco's features is exported to the COCO layout."""

import json
import os

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conddetr_jax import data
from conddetr_jax.data import coco, synthetic
from configs import default


class CocoLikeShapes(tfds.core.GeneratorBasedBuilder):
  """The synthetic shapes stored as TFDS ``coco/2017`` stores COCO (same features)."""

  VERSION = tfds.core.Version("1.0.0")
  SOURCE_ROOT = ""  # set by the test before preparing
  # TFDS finds a builder's code through importlib_resources, which this environment lacks; the
  # path only serves to locate optional checksum files.
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "objects": tfds.features.Sequence(
            {
              "id": np.int64,
              "area": np.int64,
              "bbox": tfds.features.BBoxFeature(),
              "label": tfds.features.ClassLabel(
                names=[n for n, _ in synthetic.CATEGORIES.values()]
              ),
              "is_crowd": np.bool_,
            }
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}

  def _generate_examples(self, split):
    with open(os.path.join(self.SOURCE_ROOT, "annotations", f"instances_{split}2017.json")) as f:
      content = json.load(f)
    label = {cid: k for k, cid in enumerate(synthetic.CATEGORIES)}
    for im in content["images"]:
      anns = [a for a in content["annotations"] if a["image_id"] == im["id"]]
      h, w = im["height"], im["width"]
      yield (
        im["file_name"],
        {
          "image": os.path.join(self.SOURCE_ROOT, f"{split}2017", im["file_name"]),
          "image/filename": im["file_name"],
          "image/id": im["id"],
          "objects": [
            {
              "id": a["id"],
              "area": int(a["area"]),
              "label": label[a["category_id"]],
              "is_crowd": bool(a["iscrowd"]),
              "bbox": tfds.features.BBox(
                ymin=a["bbox"][1] / h,
                xmin=a["bbox"][0] / w,
                ymax=(a["bbox"][1] + a["bbox"][3]) / h,
                xmax=(a["bbox"][0] + a["bbox"][2]) / w,
              ),
            }
            for a in anns
          ],
        },
      )


def test_tfds_source_exports_images_and_annotations(tmp_path):
  source = str(tmp_path / "source")
  synthetic.write_dataset(source, 6, 3, synthetic.Scenes(image_size=(40, 56)), seed=4)
  CocoLikeShapes.SOURCE_ROOT = source
  tfds_dir = str(tmp_path / "tfds")
  CocoLikeShapes(data_dir=tfds_dir).download_and_prepare()

  config = default.get_config()
  config.dataset.update(
    dict(
      source="tfds",
      tfds_name="coco_like_shapes",
      tfds_data_dir=tfds_dir,
      root=str(tmp_path / "export"),
    )
  )
  data.prepare_dataset(config)
  for split in ("train", "val"):
    with open(os.path.join(source, "annotations", f"instances_{split}2017.json")) as f:
      original = json.load(f)
    exported = coco.load_split(config, split)
    assert exported.image_ids.tolist() == [im["id"] for im in original["images"]]
    for i, im in enumerate(original["images"]):
      np.testing.assert_array_equal(exported.sizes[i], [im["height"], im["width"]])
      with (
        open(exported.path(i), "rb") as f,
        open(os.path.join(source, f"{split}2017", im["file_name"]), "rb") as g,
      ):
        assert f.read() == g.read()  # the JPEG bytes are copied, not re-encoded
      boxes = [a["bbox"] for a in original["annotations"] if a["image_id"] == im["id"]]
      xyxy = exported.boxes[exported.box_start[i] : exported.box_start[i + 1]]
      np.testing.assert_allclose(
        np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1), boxes, atol=1e-3
      )
  # Not a coco/* name: labels are the TFDS label indices.
  assert data.category_names(config) == {0: "square", 1: "disc", 2: "triangle", 3: "cross"}
  data.prepare_dataset(config)  # exported already: a no-op


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
  config = default.get_config()
  config.dataset.update(
    dict(
      source="tfds",
      tfds_name="coco/2017",
      tfds_data_dir=str(tmp_path / "none"),
      root=str(tmp_path / "export"),
    )
  )
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.prepare_dataset(config)
