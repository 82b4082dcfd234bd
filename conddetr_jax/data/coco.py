"""Dataset sources: where a split's json and images are, and its annotations as flat arrays.

Three sources (``config.dataset.source``), all read through the same COCO-format loader:
  coco:      the original's layout under ``config.dataset.root`` (``annotations/instances_{split}2017.json``
             and ``{split}2017/`` or ``images/{split}2017/``), or any COCO-format dataset given by
             ``config.dataset.{split}_ann`` and ``config.dataset.{split}_images``.
  synthetic: drawn shapes, generated under ``config.dataset.root`` by ``prepare_dataset``.
  tfds:      a prepared TFDS ``coco/2017``, exported once to the COCO layout under ``root``.

Annotations are handled as in the original's ``ConvertCocoPolysToMask``: crowd boxes are
dropped, boxes are clipped to the image, boxes with non-positive width or height are dropped,
and category ids are the labels. Images without annotations are kept (they are negatives).
"""

import dataclasses
import functools
import json
import os

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from conddetr_jax.data import files
from conddetr_jax.data import synthetic

SPLITS = ("train", "val")

EXPECTED_LAYOUT = """Expected the COCO 2017 layout:
  ROOT/annotations/instances_train2017.json
  ROOT/annotations/instances_val2017.json
  ROOT/train2017/*.jpg     (or ROOT/images/train2017/*.jpg)
  ROOT/val2017/*.jpg       (or ROOT/images/val2017/*.jpg)
with config.dataset.root=ROOT, or a custom COCO-format dataset given by
config.dataset.train_ann / train_images and config.dataset.val_ann / val_images."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's images and training targets, as flat numpy arrays.

  Attributes:
    ann_path: the json file.
    image_dir: the folder that ``file_names`` are relative to.
    image_ids: (N,) int64, sorted ascending (the original's order).
    file_names: (N,) str.
    sizes: (N, 2) int32 (h, w) as listed in the json (read from the file if the json lacks them).
    box_start: (N + 1,) int64: boxes of image i are ``boxes[box_start[i]:box_start[i + 1]]``.
    boxes: (K, 4) float32 absolute xyxy, clipped to the image, positive width and height.
    labels: (K,) int32 category ids.
    categories: category id -> name.
    missing: (N,) bool, True where the image file does not exist.
  """
  ann_path: str
  image_dir: str
  image_ids: np.ndarray
  file_names: np.ndarray
  sizes: np.ndarray
  box_start: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  categories: dict[int, str]
  missing: np.ndarray

  def __len__(self) -> int:
    return len(self.image_ids)

  def path(self, index: int) -> str:
    """The image file of item ``index``."""
    return os.path.join(self.image_dir, str(self.file_names[index]))


def synthetic_scenes(config: ml_collections.ConfigDict) -> synthetic.Scenes:
  """The synthetic dataset's drawing parameters from ``config.dataset.synthetic_*``."""
  ds = config.dataset
  return synthetic.Scenes(image_size=tuple(ds.synthetic_image_size), object_size=tuple(ds.synthetic_object_size),
                          max_objects=ds.synthetic_max_objects, max_overlap=ds.synthetic_max_overlap)


def default_generated_root(config: ml_collections.ConfigDict) -> str:
  """Where a generated (synthetic) or exported (tfds) dataset lives when ``root`` is empty."""
  ds = config.dataset
  if ds.source == "synthetic":
    scenes = synthetic_scenes(config)
    name = "_".join(["synthetic"] + [f"{v:g}" for v in (ds.synthetic_num_train, ds.synthetic_num_val,
                                                        *scenes.image_size, *scenes.object_size,
                                                        scenes.max_objects, scenes.max_overlap, ds.synthetic_seed)])
  else:
    name = "tfds_" + ds.tfds_name.replace("/", "_")
  cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(cache, "conddetr_jax", name)


def _root(config: ml_collections.ConfigDict) -> str:
  ds = config.dataset
  if ds.root:
    files.require_local_path(ds.root, "config.dataset.root")
  if ds.source in ("synthetic", "tfds"):
    return ds.root or default_generated_root(config)
  if ds.source != "coco":
    raise ValueError(f"config.dataset.source={ds.source!r}: expected coco, synthetic or tfds")
  return ds.root


def resolve_split(config: ml_collections.ConfigDict, split: str) -> tuple[str, str]:
  """The (json path, image folder) of ``split``; raises if either is missing.

  Raises:
    ValueError: unknown split, or no way to find it from the config.
    FileNotFoundError: the json or the image folder does not exist (the message names the path
      and shows the expected layout).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  ds = config.dataset
  ann, images = ds[f"{split}_ann"], ds[f"{split}_images"]
  if ds.source == "coco" and (ann or images):
    if not (ann and images):
      raise ValueError(f"config.dataset.{split}_ann and config.dataset.{split}_images must be given together "
                       f"(got {ann!r} and {images!r}).\n{EXPECTED_LAYOUT}")
  else:
    root = _root(config)
    if not root:
      raise ValueError(f"config.dataset.root is empty.\n{EXPECTED_LAYOUT}")
    ann = os.path.join(root, "annotations", f"instances_{split}2017.json")
    images = os.path.join(root, f"{split}2017")
    if not os.path.isdir(images) and os.path.isdir(os.path.join(root, "images", f"{split}2017")):
      images = os.path.join(root, "images", f"{split}2017")
  if not os.path.isfile(ann):
    raise FileNotFoundError(f"Annotation file not found: {ann}\n{EXPECTED_LAYOUT}")
  if not os.path.isdir(images):
    raise FileNotFoundError(f"Image folder not found: {images}\n{EXPECTED_LAYOUT}")
  return ann, images


def annotation_path(config: ml_collections.ConfigDict, split: str) -> str:
  """The json of ``split`` (evaluation reads it as the COCO ground truth)."""
  return resolve_split(config, split)[0]


def _missing_files(image_dir: str, file_names: list[str]) -> np.ndarray:
  """(N,) bool: which files do not exist. One directory listing instead of N stat calls."""
  present = set(os.listdir(image_dir))
  return np.array([(not os.path.exists(os.path.join(image_dir, f))) if os.sep in f else f not in present
                   for f in file_names], bool)


def _image_size(path: str) -> tuple[int, int] | None:
  """(h, w) from the file header, or None if unreadable."""
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except (OSError, ValueError):
    return None


def parse_annotations(content: dict, ann_path: str, image_dir: str) -> Split:
  """Builds a Split from a parsed COCO json (see the module docstring for the box rules)."""
  images = sorted(content.get("images", []), key=lambda im: im["id"])
  if not images:
    raise ValueError(f"{ann_path} lists no images")
  image_ids = np.array([im["id"] for im in images], np.int64)
  if len(np.unique(image_ids)) != len(image_ids):
    raise ValueError(f"{ann_path} lists an image id more than once")
  file_names = [str(im["file_name"]) for im in images]
  missing = _missing_files(image_dir, file_names)
  sizes = np.zeros((len(images), 2), np.int32)
  unknown = []
  for i, im in enumerate(images):
    if im.get("height") and im.get("width"):
      sizes[i] = im["height"], im["width"]
    else:
      size = None if missing[i] else _image_size(os.path.join(image_dir, file_names[i]))
      if size is None:
        unknown.append(i)
      else:
        sizes[i] = size
  if unknown:
    # Unreadable anyway (skipped or an error at load time); any plausible size will do.
    known = np.setdiff1d(np.arange(len(images)), unknown)
    sizes[unknown] = np.median(sizes[known], axis=0).astype(np.int32) if len(known) else (1, 1)

  row = {int(i): r for r, i in enumerate(image_ids)}
  per_image = [[] for _ in images]
  for a in content.get("annotations", []):
    if a.get("iscrowd", 0) or a.get("image_id") not in row:
      continue
    bbox = a.get("bbox")
    if not bbox or len(bbox) != 4:
      continue
    r = row[a["image_id"]]
    h, w = sizes[r]
    x1, y1 = bbox[0], bbox[1]
    x2, y2 = x1 + bbox[2], y1 + bbox[3]
    x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
    y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
    if x2 > x1 and y2 > y1:
      per_image[r].append((x1, y1, x2, y2, a["category_id"]))
  counts = np.array([len(p) for p in per_image], np.int64)
  flat = [t for p in per_image for t in p]
  table = np.array(flat, np.float64).reshape(-1, 5)
  categories = {int(c["id"]): str(c.get("name", c["id"])) for c in content.get("categories", [])}
  return Split(ann_path=ann_path, image_dir=image_dir, image_ids=image_ids,
               file_names=np.array(file_names, dtype=object), sizes=sizes,
               box_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
               boxes=table[:, :4].astype(np.float32), labels=table[:, 4].astype(np.int32),
               categories=categories, missing=missing)


@functools.lru_cache(maxsize=4)
def _load_cached(ann_path: str, image_dir: str, mtime_ns: int) -> Split:
  del mtime_ns  # part of the cache key only: a rewritten json is read again
  with open(ann_path) as f:
    try:
      content = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{ann_path} is not valid json: {e}") from e
  split = parse_annotations(content, ann_path, image_dir)
  n_missing = int(split.missing.sum())
  if n_missing == len(split):
    raise FileNotFoundError(f"None of the {len(split)} images listed in {ann_path} is in {image_dir} "
                            f"(e.g. {split.path(0)}).\n{EXPECTED_LAYOUT}")
  if n_missing:
    examples = ", ".join(split.path(i) for i in np.flatnonzero(split.missing)[:3])
    logging.warning("%d of %d images listed in %s are missing (e.g. %s)", n_missing, len(split), ann_path,
                    examples)
  return split


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
  """The annotations of ``split`` (parsed once per process, then cached)."""
  ann, images = resolve_split(config, split)
  return _load_cached(ann, images, os.stat(ann).st_mtime_ns)


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Makes the dataset available: generates (synthetic) or exports (tfds) it if absent, then
  checks that both splits' json and image folder exist.

  Raises:
    FileNotFoundError: a json or image folder is missing (the message shows the expected layout).
  """
  ds = config.dataset
  if ds.source == "synthetic":
    root = _root(config)
    if synthetic.write_dataset(root, ds.synthetic_num_train, ds.synthetic_num_val, synthetic_scenes(config),
                               ds.synthetic_seed):
      logging.info("Wrote the synthetic dataset to %s", root)
  elif ds.source == "tfds":
    # Imported here: tensorflow_datasets is slow to import and only this source needs it.
    from conddetr_jax.data import tfds_export  # pylint: disable=g-import-not-at-top
    tfds_export.export(ds.tfds_name, ds.tfds_data_dir or None, _root(config))
  for split in SPLITS:
    try:
      resolve_split(config, split)
    except FileNotFoundError as e:  # every command says which setting to fix, the same way
      raise FileNotFoundError(f"config.dataset (source={ds.source!r}, root={ds.root!r}) names no dataset: {e}"
                              ) from None


def num_classes(config: ml_collections.ConfigDict) -> int:
  """Max category id + 1 of the train json (the original's convention; 91 for COCO)."""
  split = load_split(config, "train")
  ids = list(split.categories) + split.labels.tolist()
  if not ids:
    raise ValueError(f"{split.ann_path} has neither categories nor annotations")
  return max(ids) + 1


def category_names(config: ml_collections.ConfigDict) -> dict[int, str]:
  """Category id -> name, from the train json."""
  return dict(load_split(config, "train").categories)
