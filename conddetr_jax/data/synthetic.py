"""A small COCO-format detection dataset of drawn shapes: the built-in default, nothing downloaded.

Each image is a textured background (colour gradient, stripes, noise) with 1 to ``max_objects``
filled shapes (``Scenes`` holds these parameters). Every class has its own shape and base colour
(jittered), so a small detector tells the classes apart within minutes; category ids are
deliberately non-contiguous, as in COCO. Boxes may overlap (pairwise IoU up to ``max_overlap``), so
later shapes partly occlude earlier ones. Boxes are the tight extent of each drawn shape, hidden
parts included (amodal), so heavy overlap makes some boxes impossible to see whole.

The output follows the original's COCO layout, so the ``coco`` source reads it unchanged:
``ROOT/annotations/instances_{train,val}2017.json`` and ``ROOT/{train,val}2017/*.jpg``.
Every image is a pure function of (seed, split, index): generation is deterministic and may run
in several processes at once (each file is written to a temporary name and renamed).
"""

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from conddetr_jax.data import files

# id -> (name, base RGB colour). Ids are non-contiguous on purpose (num_classes = 10).
CATEGORIES = {
  2: ("square", (220, 50, 40)),
  5: ("disc", (40, 170, 60)),
  7: ("triangle", (40, 80, 220)),
  9: ("cross", (235, 200, 30)),
}
_PLACEMENT_ATTEMPTS = 20  # an object that finds no place this often (too much overlap) is skipped
_JPEG_QUALITY = 90
_MARKER = "synthetic.json"  # written last: its presence (with equal parameters) means "complete"


@dataclasses.dataclass(frozen=True)
class Scenes:
  """What the drawn images look like.

  Attributes:
    image_size: (min, max) image height and width in pixels, each drawn independently.
    object_size: (min, max) object side (before its aspect jitter) as a fraction of the image's
      shorter side.
    max_objects: each image draws 1 to this many objects.
    max_overlap: the largest IoU allowed between two boxes of one image (0: no overlap).
  """

  image_size: tuple[int, int] = (128, 192)
  object_size: tuple[float, float] = (0.15, 0.45)
  max_objects: int = 6
  max_overlap: float = 0.35

  def validate(self) -> None:
    """Raises ValueError naming the first parameter out of range."""
    if not 0 < self.image_size[0] <= self.image_size[1]:
      raise ValueError(f"synthetic image size range {self.image_size} must satisfy 0 < min <= max")
    if not 0 < self.object_size[0] <= self.object_size[1] <= 1:
      raise ValueError(f"synthetic object size {self.object_size} must satisfy 0 < min <= max <= 1")
    if self.max_objects < 1:
      raise ValueError(f"synthetic max_objects={self.max_objects} must be >= 1")
    if not 0 <= self.max_overlap <= 1:
      raise ValueError(f"synthetic max_overlap={self.max_overlap} must be in [0, 1]")

  def as_json(self) -> dict[str, Any]:
    """The parameters as plain json values (the dataset's marker records them)."""
    return {
      "size_range": [int(v) for v in self.image_size],
      "object_size": [float(v) for v in self.object_size],
      "max_objects": int(self.max_objects),
      "max_overlap": float(self.max_overlap),
    }


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """(h, w, 3) float32 in [0, 255]: muted gradient + stripes + pixel noise."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  c0, c1 = rng.uniform(60, 190, size=(2, 3)).astype(np.float32)
  angle = rng.uniform(0, np.pi)
  t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  img = c0 + (c1 - c0) * t[..., None]
  period = rng.uniform(6, 24)
  stripe_angle = rng.uniform(0, np.pi)
  phase = (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * (2 * np.pi / period)
  img += rng.uniform(5, 20) * np.sin(phase)[..., None]
  img += rng.normal(0, 8, size=(h, w, 3)).astype(np.float32)
  return img


def _shape_mask(name: str, rng: np.random.Generator, bh: int, bw: int) -> np.ndarray:
  """(bh, bw) bool mask of a shape filling its box (its tight extent is the whole box)."""
  yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
  # Pixel centres in [-1, 1] across the box.
  u = (xx + 0.5) / bw * 2 - 1
  v = (yy + 0.5) / bh * 2 - 1
  if name == "square":
    return np.ones((bh, bw), bool)
  if name == "disc":
    return u * u + v * v <= 1.0
  if name == "triangle":
    # Apex on the top or bottom edge; the base spans the opposite edge.
    if rng.random() < 0.5:
      v = -v
    return np.abs(u) <= (1 - v) / 2 + 1.0 / bw
  if name == "cross":
    arm = rng.uniform(0.25, 0.45)
    return (np.abs(u) <= arm) | (np.abs(v) <= arm)
  raise ValueError(name)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one xywh box with (n, 4) xywh boxes."""
  x1 = np.maximum(box[0], boxes[:, 0])
  y1 = np.maximum(box[1], boxes[:, 1])
  x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
  y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
  inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
  return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter)


def draw_image(
  seed: int, split_code: int, index: int, scenes: Scenes = Scenes()
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Draws one image and its objects.

  Args:
    seed: dataset seed.
    split_code: 0 for train, 1 for val (different images per split).
    index: image index within the split.
    scenes: the image and object parameters.
  Returns:
    (h, w, 3) uint8 image and a list of {"bbox": [x, y, w, h], "category_id", "area"} dicts.
  """
  rng = np.random.default_rng([seed, split_code, index])
  h, w = (int(v) for v in rng.integers(scenes.image_size[0], scenes.image_size[1] + 1, size=2))
  img = _background(rng, h, w)
  ids = list(CATEGORIES)
  boxes = np.zeros((0, 4), np.float32)
  objects = []
  for _ in range(int(rng.integers(1, scenes.max_objects + 1))):
    cat = ids[int(rng.integers(len(ids)))]
    name, colour = CATEGORIES[cat]
    for _attempt in range(_PLACEMENT_ATTEMPTS):
      side = rng.uniform(*scenes.object_size) * min(h, w)
      aspect = rng.uniform(0.7, 1.4) if name != "disc" else rng.uniform(0.8, 1.25)
      bw = max(4, min(w, int(round(side * aspect))))
      bh = max(4, min(h, int(round(side / aspect))))
      x = int(rng.integers(0, w - bw + 1))
      y = int(rng.integers(0, h - bh + 1))
      box = np.array([x, y, bw, bh], np.float32)
      if not len(boxes) or _iou(box, boxes).max() <= scenes.max_overlap:
        break
    else:
      continue
    mask = _shape_mask(name, rng, bh, bw)
    rows, cols = np.nonzero(mask)
    fill = np.clip(np.array(colour, np.float32) + rng.uniform(-25, 25, size=3), 0, 255)
    shade = fill + rng.normal(0, 6, size=(bh, bw, 3))
    region = img[y : y + bh, x : x + bw]
    region[mask] = shade[mask]
    x0, y0 = x + int(cols.min()), y + int(rows.min())
    tight = [x0, y0, x + int(cols.max()) + 1 - x0, y + int(rows.max()) + 1 - y0]
    boxes = np.concatenate([boxes, box[None]])
    objects.append(
      {"bbox": [float(v) for v in tight], "category_id": cat, "area": float(mask.sum())}
    )
  return np.clip(img, 0, 255).astype(np.uint8), objects


def _write_split(
  root: str, split: str, split_code: int, num_images: int, scenes: Scenes, seed: int
) -> None:
  image_dir = os.path.join(root, f"{split}2017")
  os.makedirs(image_dir, exist_ok=True)
  images, annotations = [], []
  for index in range(num_images):
    image_id = index + 1
    pixels, objects = draw_image(seed, split_code, index, scenes)
    file_name = f"{image_id:012d}.jpg"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=_JPEG_QUALITY)
    files.write_atomic(os.path.join(image_dir, file_name), buf.getvalue())
    images.append(
      {"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]}
    )
    for obj in objects:
      x, y, bw, bh = obj["bbox"]
      annotations.append(
        dict(
          obj,
          id=len(annotations) + 1,
          image_id=image_id,
          iscrowd=0,
          segmentation=[[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
        )
      )
  categories = [
    {"id": cid, "name": name, "supercategory": "shape"} for cid, (name, _) in CATEGORIES.items()
  ]
  content = {
    "info": {"description": "conddetr_jax synthetic shapes"},
    "images": images,
    "annotations": annotations,
    "categories": categories,
  }
  files.write_atomic(
    os.path.join(root, "annotations", f"instances_{split}2017.json"), json.dumps(content).encode()
  )


def write_dataset(
  root: str, num_train: int, num_val: int, scenes: Scenes = Scenes(), seed: int = 0
) -> bool:
  """Writes the dataset under ``root`` unless an identical one is already there.

  Args:
    root: output folder (created if needed).
    num_train: number of train images.
    num_val: number of val images.
    scenes: the image and object parameters.
    seed: generator seed; the dataset is a pure function of all the arguments but ``root``.
  Returns:
    True if the dataset was written, False if it was already complete.
  Raises:
    ValueError: ``root`` holds a synthetic dataset with other parameters.
  """
  scenes.validate()
  params = {
    "num_train": int(num_train),
    "num_val": int(num_val),
    "seed": int(seed),
    **scenes.as_json(),
  }
  marker = os.path.join(root, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      existing = json.load(f)
    if existing == params:
      return False
    raise ValueError(
      f"{root} already holds a synthetic dataset with parameters {existing}, not {params}; "
      "choose another config.dataset.synthetic_dir or delete it."
    )
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  _write_split(root, "train", 0, num_train, scenes, seed)
  _write_split(root, "val", 1, num_val, scenes, seed)
  files.write_atomic(marker, json.dumps(params).encode())
  return True
