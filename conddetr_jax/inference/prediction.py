"""predict.py's library: detections on image files, drawn into PNGs and listed in
detections.json."""

import json
import math
import os
from typing import Any, Sequence

from absl import logging
import flax
import ml_collections

from conddetr_jax import data, storage, visualize
from conddetr_jax.data import image_files
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.inference import attention_maps

# COCO 2017's 80 category ids (of 1..90) and names: predict.py labels COCO models with them when no
# dataset json is at hand.
COCO_CATEGORY_NAMES = {
  1: "person",
  2: "bicycle",
  3: "car",
  4: "motorcycle",
  5: "airplane",
  6: "bus",
  7: "train",
  8: "truck",
  9: "boat",
  10: "traffic light",
  11: "fire hydrant",
  13: "stop sign",
  14: "parking meter",
  15: "bench",
  16: "bird",
  17: "cat",
  18: "dog",
  19: "horse",
  20: "sheep",
  21: "cow",
  22: "elephant",
  23: "bear",
  24: "zebra",
  25: "giraffe",
  27: "backpack",
  28: "umbrella",
  31: "handbag",
  32: "tie",
  33: "suitcase",
  34: "frisbee",
  35: "skis",
  36: "snowboard",
  37: "sports ball",
  38: "kite",
  39: "baseball bat",
  40: "baseball glove",
  41: "skateboard",
  42: "surfboard",
  43: "tennis racket",
  44: "bottle",
  46: "wine glass",
  47: "cup",
  48: "fork",
  49: "knife",
  50: "spoon",
  51: "bowl",
  52: "banana",
  53: "apple",
  54: "sandwich",
  55: "orange",
  56: "broccoli",
  57: "carrot",
  58: "hot dog",
  59: "pizza",
  60: "donut",
  61: "cake",
  62: "chair",
  63: "couch",
  64: "potted plant",
  65: "bed",
  67: "dining table",
  70: "toilet",
  72: "tv",
  73: "laptop",
  74: "mouse",
  75: "remote",
  76: "keyboard",
  77: "cell phone",
  78: "microwave",
  79: "oven",
  80: "toaster",
  81: "sink",
  82: "refrigerator",
  84: "book",
  85: "clock",
  86: "vase",
  87: "scissors",
  88: "teddy bear",
  89: "hair drier",
  90: "toothbrush",
}
COCO_NUM_CLASSES = 91


def class_names(config: ml_collections.ConfigDict) -> dict[int, str]:
  """Category id -> name: the dataset's json if it is at hand, else COCO's names for a 91-class
  model, else none (labels are then drawn as 'class <id>')."""
  try:
    return data.category_names(config)
  except (FileNotFoundError, ValueError) as e:
    if config.model.num_classes == COCO_NUM_CLASSES:
      return dict(COCO_CATEGORY_NAMES)
    logging.warning("No class names (%s); labels are drawn as numbers", str(e).splitlines()[0])
    return {}


def _output_stems(paths: Sequence[str]) -> list[str]:
  """A distinct file stem per input ('a/x.jpg', 'b/x.jpg' -> 'x', 'x_1')."""
  stems, seen = [], {}
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    count = seen.get(stem, 0)
    seen[stem] = count + 1
    stems.append(stem if not count else f"{stem}_{count}")
  return stems


def predict_files(
  config: ml_collections.ConfigDict,
  model: flax.linen.Module,
  variables: Any,
  paths: Sequence[str],
  out_dir: str,
  threshold: float,
  attention_layer: int | None = None,
) -> list[dict[str, Any]]:
  """Detects objects in image files; writes ``out_dir/<stem>.png`` and ``out_dir/detections.json``.

  With ``attention_layer`` (a decoder layer; -1 the last), also each kept detection's
  cross-attention maps in that layer: ``out_dir/<stem>_attention_<i>.png`` and ``.npz``
  (``attention_maps``).

  Images smaller than ``visualize.MIN_DRAWN_SIDE`` are drawn enlarged; the json's boxes are in the
  file's own pixels.

  Every image is read before the model runs, so a bad file fails fast, naming it.

  Args:
    config: the run config (model, dataset sizes, ``coco_eval.top_k``).
    model: the detector.
    variables: its ``{'params', 'batch_stats'}``.
    paths: image files.
    out_dir: output folder (created).
    threshold: lowest score kept (in the PNGs and the json).
    attention_layer: the decoder layer whose attention maps are written; None: none.

  Returns:
    One record per image, as written to the json: ``{"file", "png", "width", "height", "best_score",
    "detections": [{"label", "name", "score", "box_xyxy"}, ...]}`` (boxes in the file's pixels,
    sorted by decreasing score; ``best_score``: the highest score, kept or not), and with
    ``attention_layer`` ``"attention": [{"png", "npz"}, ...]``, one per kept detection.
  """
  storage.check_reachable(out_dir, "--out")
  images = [image_files.load_image(p, config) for p in paths]
  names = class_names(config)
  out = storage.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  records = []
  for path, stem, loaded in zip(paths, _output_stems(paths), images):
    dets = coco_eval.detect_image(variables, loaded, model=model, k=coco_eval.top_k(config))
    scores, labels, boxes = dets["scores"], dets["labels"], dets["boxes"]
    png = os.fspath(out / f"{stem}.png")
    visualize.save_detections_png(png, loaded.pixels, dets, names, threshold)
    keep = scores >= threshold
    record = {
      "file": storage.display(path),
      "png": storage.display(png),
      "height": int(loaded.orig_size[0, 0]),
      "width": int(loaded.orig_size[0, 1]),
      "best_score": float(scores[0]) if len(scores) else 0.0,
      "detections": [
        {
          "label": int(c),
          "name": visualize.class_name(c, names),
          "score": float(s),
          "box_xyxy": [float(v) for v in b],
        }
        for c, s, b in zip(labels[keep], scores[keep], boxes[keep])
      ],
    }
    if attention_layer is not None:
      kept = attention_maps.detection_attention(
        model,
        variables,
        loaded,
        k=coco_eval.top_k(config),
        threshold=threshold,
        layer=attention_layer,
      )
      record["attention"] = attention_maps.write_files(out_dir, stem, loaded.pixels, kept, names)
    records.append(record)
  storage.write_bytes(out / coco_eval.DETECTIONS_FILE, json.dumps(records, indent=1).encode())
  return records


def suggested_threshold(best_score: float) -> float:
  """A ``--threshold`` that keeps the best detection: its score rounded down to one significant
  digit (0.48 -> 0.4, 0.031 -> 0.03)."""
  if best_score <= 0:
    return 0.0
  step = 10.0 ** math.floor(math.log10(best_score))
  return round(math.floor(best_score / step) * step, 10)


def describe_record(record: dict[str, Any], threshold: float) -> str:
  """predict.py's line for one image: its detections and drawing, or, when none scores
  ``threshold``, the best score and a ``--threshold`` that would show it."""
  if record["detections"]:
    return f"{record['file']}: {len(record['detections'])} detections -> {record['png']}"
  return (
    f"{record['file']}: no detection scores >= {threshold:g} (the best scores "
    f"{record['best_score']:.3f}); try --threshold={suggested_threshold(record['best_score']):g}"
  )
