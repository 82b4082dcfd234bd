"""Inference outside the training loop: restore weights from any checkpoint, detect on image files.

Used by eval.py and predict.py. A checkpoint is one of:
- a training workdir (its latest step), its ``checkpoints/`` folder (the latest step), or one step's
  folder (``<workdir>/checkpoints/<step>``): Orbax, as ``training/checkpoint.py`` writes it; only the
  model's variables are read, on any number of devices;
- an Orbax checkpoint holding just ``{'params', 'batch_stats'}`` (``python -m conddetr_jax.convert``);
- a PyTorch/HF file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``): converted on the fly by
  ``convert.from_torch``.

Single images are read with PIL and resized as the original's evaluation (shorter side
``eval_size``, longer side at most ``eval_max_size``; PIL bilinear, as the original), then padded to
a multiple of ``size_divisibility``.
"""

import dataclasses
import json
import os
from typing import Any, Sequence

from absl import logging
from etils import epath
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image, ImageOps

from conddetr_jax import convert
from conddetr_jax import data
from conddetr_jax import evaluation
from conddetr_jax import models
from conddetr_jax import visualize
from conddetr_jax.data import batching
from conddetr_jax.data import transforms
from conddetr_jax.training import loop
from conddetr_jax.training import metrics as metrics_lib
from conddetr_jax.training import parallel

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
DETECTIONS_FILE = "detections.json"
_VARIABLE_COLLECTIONS = ("params", "batch_stats")
_TRAIN_STATE_ITEM = "state"  # the item of a step folder that training/checkpoint.py saves the state in
_ORBAX_METADATA = "_METADATA"  # present in every Orbax PyTree checkpoint folder

# COCO 2017's 80 category ids (of 1..90) and names: predict.py labels COCO models with them when no
# dataset json is at hand.
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter",
    15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant",
    23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
    33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite",
    39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket",
    44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl",
    52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator",
    84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}
COCO_NUM_CLASSES = 91


# ------------------------------------------------------------------------------------ checkpoints

def _latest_step_dir(directory: epath.Path) -> epath.Path | None:
  """The newest complete step folder of an Orbax ``CheckpointManager`` directory, or None."""
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  return None if step is None else directory / str(step)


def resolve_orbax_checkpoint(path: str) -> str:
  """The Orbax tree that holds the variables, from a workdir, a checkpoints folder or a step folder.

  Returns:
    A folder whose Orbax tree has ``params`` and ``batch_stats`` at its top level (possibly
    among other entries, e.g. a train state's ``opt_state``).

  Raises:
    FileNotFoundError: nothing at ``path`` or no checkpoint in it (the message says what was expected).
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if (p / loop.CHECKPOINT_DIR).is_dir():  # a workdir
    p = p / loop.CHECKPOINT_DIR
  if not (p / _ORBAX_METADATA).exists() and not (p / _TRAIN_STATE_ITEM).exists():  # a checkpoints folder
    p = _latest_step_dir(p) or p
  if (p / _TRAIN_STATE_ITEM / _ORBAX_METADATA).exists():  # one training step
    return os.fspath(p / _TRAIN_STATE_ITEM)
  if (p / _ORBAX_METADATA).exists():  # an Orbax tree of the variables
    return os.fspath(p)
  raise FileNotFoundError(
      f"no checkpoint in {path}: expected a training workdir (with {loop.CHECKPOINT_DIR}/<step>/), "
      f"its {loop.CHECKPOINT_DIR}/ folder, one step folder, an Orbax checkpoint of the variables, "
      f"or a PyTorch/HF file ({', '.join(TORCH_SUFFIXES)})")


def _check_fits(saved: Any, target: Any, tree: str, config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the tensors that differ between a checkpoint and the model."""
  have = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      {c: saved.get(c, {}) for c in _VARIABLE_COLLECTIONS}, sep="/").items()}
  want = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(target, sep="/").items()}
  problems = [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in sorted(want.keys() & have.keys())
              if have[k] != want[k]]
  problems += [f"{k}: not in the checkpoint" for k in sorted(want.keys() - have.keys())]
  problems += [f"{k}: not in the model" for k in sorted(have.keys() - want.keys())]
  if problems:
    m = config.model
    raise ValueError(
        f"the checkpoint {tree} does not fit the model of this config (backbone {m.backbone}, hidden_dim "
        f"{m.hidden_dim}, {m.enc_layers}+{m.dec_layers} layers, num_queries {m.num_queries}, num_classes "
        f"{m.num_classes}); {len(problems)} tensors differ:\n  " + "\n  ".join(problems[:10]))


def load_variables(config: ml_collections.ConfigDict, path: str,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[Any, int | None]:
  """The model's ``{'params', 'batch_stats'}`` from a checkpoint (see the module docstring); a
  model without frozen BatchNorm (``backbone_norm='group_norm'``) has no ``batch_stats``.

  Args:
    config: the run config; its model must be the checkpoint's (same backbone, sizes, classes).
    path: the checkpoint.
    sharding: where Orbax places the arrays (e.g. replicated on the mesh); default: the first
      local device. Converted PyTorch weights are host arrays.

  Returns:
    The variables, and the training step they are from (None for other checkpoints).

  Raises:
    FileNotFoundError: nothing at ``path``, or no checkpoint there.
    ValueError: the checkpoint does not fit the config's model (the message says how).
  """
  if os.path.isfile(path) or path.endswith(TORCH_SUFFIXES):
    if not path.endswith(TORCH_SUFFIXES):
      raise ValueError(f"{path} is a file but not a PyTorch/HF checkpoint ({', '.join(TORCH_SUFFIXES)}); "
                       "Orbax checkpoints are folders")
    return convert.from_torch(path, config), None
  tree = resolve_orbax_checkpoint(path)
  model = models.build_model(config)
  abstract = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        {k: abstract[k] for k in _VARIABLE_COLLECTIONS if k in abstract})
  restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    _check_fits(checkpointer.metadata(tree).item_metadata.tree, target, tree, config)
    variables = checkpointer.restore(tree, args=restore)
  logging.info("Restored the model's variables from %s", tree)
  p = epath.Path(tree)
  return variables, int(p.parent.name) if p.name == _TRAIN_STATE_ITEM and p.parent.name.isdigit() else None


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, workdir: str,
                        split: str = "val") -> evaluation.EvalResult:
  """eval.py: COCO box AP of a checkpoint on all devices (of all processes; collective).

  Writes ``workdir/detections.json`` (COCO results format) and appends ``{"step", "checkpoint",
  "split", AP, AP50, ...}`` to ``workdir/metrics.jsonl`` (process 0). ``step`` is the training step
  of an Orbax checkpoint, null for a PyTorch/HF file.

  Raises:
    FileNotFoundError: no checkpoint, or no dataset, at the given paths.
    ValueError: the checkpoint does not fit the config's model.
    data.BadImageError: an image of the split is missing or unreadable (named).
  """
  data.prepare_dataset(config)
  mesh = parallel.make_mesh()
  model = models.build_model(config)
  variables, step = load_variables(config, checkpoint, parallel.replicated(mesh))
  result = evaluation.run_evaluation(config, model, variables, mesh, split=split,
                                     detections_path=os.path.join(workdir, DETECTIONS_FILE))
  if jax.process_index() == 0:
    record = {"step": step, "checkpoint": os.path.abspath(checkpoint), "split": split, **result.metrics}
    with open(os.path.join(workdir, metrics_lib.METRICS_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
  return result


# ----------------------------------------------------------------------------------- image files

@dataclasses.dataclass(frozen=True)
class LoadedImage:
  """One image file, as drawn and as the model takes it.

  Attributes:
    pixels: (h, w, 3) uint8 RGB, EXIF orientation applied.
    image: (1, H, W, 3) float32, resized, ImageNet-normalised, zero-padded to a multiple of
      ``size_divisibility``.
    pad_mask: (1, H, W) bool, True on padding.
    orig_size: (1, 2) int32 (h, w) of ``pixels``.
  """
  pixels: np.ndarray
  image: np.ndarray
  pad_mask: np.ndarray
  orig_size: np.ndarray


def load_image(path: str, config: ml_collections.ConfigDict) -> LoadedImage:
  """Reads an image file of any format PIL knows and prepares it as the evaluation does.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable image (the message names it).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image not found: {path}")
  try:
    with Image.open(path) as f:
      # Phone photos store their rotation in EXIF: apply it, so boxes match what viewers show.
      pil = ImageOps.exif_transpose(f).convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  ds = config.dataset
  h, w = pil.height, pil.width
  out_h, out_w = (int(v[0]) for v in transforms.resized_size(np.array([h]), np.array([w]), ds.eval_size,
                                                             ds.eval_max_size))
  resized = np.asarray(pil.resize((out_w, out_h), Image.BILINEAR) if (out_h, out_w) != (h, w) else pil,
                       np.float32)
  normalised = (resized / 255.0 - np.array(transforms.IMAGENET_MEAN)) / np.array(transforms.IMAGENET_STD)
  pad_h, pad_w = (int(v) for v in batching.round_up(np.array([out_h, out_w]), ds.size_divisibility))
  image = np.zeros((1, pad_h, pad_w, 3), np.float32)
  image[0, :out_h, :out_w] = normalised
  pad_mask = np.ones((1, pad_h, pad_w), bool)
  pad_mask[0, :out_h, :out_w] = False
  return LoadedImage(pixels=np.asarray(pil, np.uint8), image=image, pad_mask=pad_mask,
                     orig_size=np.array([[h, w]], np.int32))


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


def predict_files(config: ml_collections.ConfigDict, model: flax.linen.Module, variables: Any,
                  paths: Sequence[str], out_dir: str, threshold: float) -> list[dict[str, Any]]:
  """Detects objects in image files; writes ``out_dir/<stem>.png`` and ``out_dir/detections.json``.

  Images smaller than ``visualize.MIN_DRAWN_SIDE`` are drawn enlarged; the json's boxes are in the
  file's own pixels.

  Every image is read before the model runs, so a bad file fails fast, naming it.

  Args:
    config: the run config (model, dataset sizes, ``evaluation.top_k``).
    model: the detector.
    variables: its ``{'params', 'batch_stats'}``.
    paths: image files.
    out_dir: output folder (created).
    threshold: lowest score kept (in the PNGs and the json).

  Returns:
    One record per image, as written to the json: ``{"file", "png", "width", "height",
    "detections": [{"label", "name", "score", "box_xyxy"}, ...]}`` (boxes in the file's pixels,
    sorted by decreasing score).
  """
  images = [load_image(p, config) for p in paths]
  names = class_names(config)
  os.makedirs(out_dir, exist_ok=True)
  records = []
  for path, stem, loaded in zip(paths, _output_stems(paths), images):
    batch = {"image": loaded.image, "pad_mask": loaded.pad_mask, "orig_size": loaded.orig_size}
    dets = jax.device_get(evaluation.predict_batch(variables, batch, model=model, k=evaluation.top_k(config)))
    scores, labels, boxes = dets["scores"][0], dets["labels"][0], dets["boxes"][0]
    png = os.path.join(out_dir, f"{stem}.png")
    visualize.save_detections_png(png, loaded.pixels, boxes, scores, labels, names, threshold,
                                  scale=visualize.enlargement(*loaded.pixels.shape[:2]))
    keep = scores >= threshold
    records.append({
        "file": os.path.abspath(path), "png": os.path.abspath(png),
        "height": int(loaded.orig_size[0, 0]), "width": int(loaded.orig_size[0, 1]),
        "detections": [{"label": int(c), "name": visualize.class_name(c, names),
                        "score": float(s), "box_xyxy": [float(v) for v in b]}
                       for c, s, b in zip(labels[keep], scores[keep], boxes[keep])],
    })
  with open(os.path.join(out_dir, "detections.json"), "w") as f:
    json.dump(records, f, indent=1)
  return records
