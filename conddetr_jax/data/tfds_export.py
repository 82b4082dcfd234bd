"""A prepared TFDS detection dataset (``coco/2017``) -> the COCO layout, written once.

The pipeline plans every epoch on the host and reads images by index, which TFDS's sequential
TFRecords do not allow; evaluation also needs the COCO json. So the TFDS splits are exported
once: the stored JPEG bytes are copied as they are (no re-encoding), the boxes go back to absolute
COCO xywh, and the labels to COCO category ids. Later runs find the export complete and skip it.

Any builder with coco's features (``image``, ``image/filename``, ``image/id``, ``objects`` with
``bbox``, ``label``, ``is_crowd``, ``area``, ``id``) works; for other names than ``coco/*`` the
category id is the TFDS label index.
"""

import io
import json
import os

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from conddetr_jax.data import files

# COCO's 80 category ids, in the order of TFDS coco's labels (its categories sorted by id).
COCO_CATEGORY_IDS = (
  1,
  2,
  3,
  4,
  5,
  6,
  7,
  8,
  9,
  10,
  11,
  13,
  14,
  15,
  16,
  17,
  18,
  19,
  20,
  21,
  22,
  23,
  24,
  25,
  27,
  28,
  31,
  32,
  33,
  34,
  35,
  36,
  37,
  38,
  39,
  40,
  41,
  42,
  43,
  44,
  46,
  47,
  48,
  49,
  50,
  51,
  52,
  53,
  54,
  55,
  56,
  57,
  58,
  59,
  60,
  61,
  62,
  63,
  64,
  65,
  67,
  70,
  72,
  73,
  74,
  75,
  76,
  77,
  78,
  79,
  80,
  81,
  82,
  84,
  85,
  86,
  87,
  88,
  89,
  90,
)
_TFDS_SPLITS = {"train": "train", "val": "validation"}
_MARKER = "tfds_export.json"


def _write_split(
  builder: tfds.core.DatasetBuilder, split: str, root: str, category_ids: list[int]
) -> None:
  image_dir = os.path.join(root, f"{split}2017")
  os.makedirs(image_dir, exist_ok=True)
  data = builder.as_dataset(
    split=_TFDS_SPLITS[split], shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
  )
  images, annotations = [], []
  for ex in tfds.as_numpy(data):
    file_name = os.path.basename(ex["image/filename"].decode())
    with Image.open(io.BytesIO(ex["image"])) as im:
      w, h = im.size
    files.write_atomic(os.path.join(image_dir, file_name), ex["image"])
    image_id = int(ex["image/id"])
    images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    obj = ex["objects"]
    for k in range(len(obj["label"])):
      ymin, xmin, ymax, xmax = (float(v) for v in obj["bbox"][k])
      annotations.append(
        {
          "id": int(obj["id"][k]),
          "image_id": image_id,
          "category_id": category_ids[int(obj["label"][k])],
          "bbox": [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h],
          "area": float(obj["area"][k]),
          "iscrowd": int(obj["is_crowd"][k]),
        }
      )
  names = builder.info.features["objects"]["label"].names
  categories = [{"id": cid, "name": name} for cid, name in zip(category_ids, names)]
  ann_dir = os.path.join(root, "annotations")
  os.makedirs(ann_dir, exist_ok=True)
  content = {"images": images, "annotations": annotations, "categories": categories}
  files.write_atomic(
    os.path.join(ann_dir, f"instances_{split}2017.json"), json.dumps(content).encode()
  )
  logging.info("Exported %d images of %s[%s] to %s", len(images), builder.name, split, image_dir)


def export(name: str, data_dir: str | None, root: str) -> None:
  """Exports the train and val splits of TFDS dataset ``name`` to the COCO layout under ``root``.

  Raises:
    FileNotFoundError: the dataset is not prepared in ``data_dir`` (nothing is downloaded here).
  """
  marker = os.path.join(root, _MARKER)
  if os.path.exists(marker):
    return
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {name} is not prepared in {builder.data_dir}. Prepare it first (e.g. `tfds "
      f"build {name.split('/')[0]} --config {name.split('/')[-1]}`, with the COCO archives "
      "downloaded by hand if this machine is offline), or use config.dataset.source='coco' with "
      "the COCO folder."
    )
  num_labels = builder.info.features["objects"]["label"].num_classes
  if name.startswith("coco/") and num_labels == len(COCO_CATEGORY_IDS):
    category_ids = list(COCO_CATEGORY_IDS)
  else:
    category_ids = list(range(num_labels))
  for split in _TFDS_SPLITS:
    _write_split(builder, split, root, category_ids)
  files.write_atomic(marker, json.dumps({"name": name, "data_dir": data_dir}).encode())
