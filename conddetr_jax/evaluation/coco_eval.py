"""COCO box AP of a model over a split, exact on any number of devices and hosts.

Every process runs the model on its slice of each global eval batch (``data.eval_iterator``: every
image once over all processes, the last batch completed with blank examples marked invalid). The
detections are gathered to every host, the blanks are dropped, and process 0 runs pycocotools'
``COCOeval`` (bbox) on boxes in original-image pixels; the 12 numbers are then broadcast, so every
process returns the same metrics.

Batch size does not change the detections: each image is padded to its size bucket, whatever its
batch mates (the original pads to the largest image of the batch, which makes its AP depend on the
eval batch size). tests/test_evaluation.py checks batch sizes 1 and 3 against each other.
"""

import contextlib
import dataclasses
import functools
import io
import json
import os
from typing import Any, Sequence

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conddetr_jax import data, progress, sharding, storage, visualize
from conddetr_jax.data import batch_spec, coco, image_files
from conddetr_jax.evaluation import postprocess

# COCOeval.stats, in order.
METRIC_NAMES = (
  "AP",
  "AP50",
  "AP75",
  "APs",
  "APm",
  "APl",
  "AR1",
  "AR10",
  "AR100",
  "ARs",
  "ARm",
  "ARl",
)
DETECTIONS_FILE = "detections.json"  # the name eval.py and predict.py write detections under
_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """What one evaluation produced.

  Attributes:
    metrics: ``METRIC_NAMES`` -> value in [0, 1] (-1 where COCOeval has no ground truth for it),
      then ``AP/<class name>`` per category of the json; the same on every process.
    summary: pycocotools' printed summary table and the per-class table on process 0, '' on the
      others.
    num_images: images evaluated (each exactly once).
  """

  metrics: dict[str, float]
  summary: str
  num_images: int


def top_k(config: ml_collections.ConfigDict) -> int:
  """Detections per image: ``config.evaluation.top_k``, at most queries x classes."""
  return min(config.evaluation.top_k, config.model.num_queries * config.model.num_classes)


@functools.partial(jax.jit, static_argnames=("model", "k"))
def predict_batch(
  variables: Any, batch: dict[str, jax.Array], *, model: flax.linen.Module, k: int
) -> dict[str, jax.Array]:
  """Model + post-processing on one padded batch (one compiled program per bucket shape).

  Args:
    variables: ``{'params', 'batch_stats'}``.
    batch: ``image`` (B, H, W, 3), ``pad_mask`` (B, H, W), ``orig_size`` (B, 2) (h, w) the size to
      scale boxes to; any other (B, ...) entry is passed through (so it is gathered with the rest).
    model: the detector.
    k: detections per image.

  Returns:
    ``scores`` (B, k) decreasing, ``labels`` (B, k), ``boxes`` (B, k, 4) absolute xyxy in
    ``orig_size`` pixels, and the passed-through entries.
  """
  out = model.apply(variables, batch["image"], batch["pad_mask"], train=False)
  dets = postprocess.postprocess(out, batch["orig_size"], top_k=k)
  passed = {key: v for key, v in batch.items() if key not in ("image", "pad_mask", "orig_size")}
  return dict(passed, **dets)


def to_coco_results(
  image_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray
) -> list[dict[str, Any]]:
  """Detections in COCO results format (the original's ``prepare_for_coco_detection``).

  Args:
    image_ids: (N,) int.
    scores: (N, K) float.
    labels: (N, K) int category ids.
    boxes: (N, K, 4) absolute xyxy in original-image pixels.

  Returns:
    N * K dicts ``{image_id, category_id, bbox: [x, y, w, h], score}`` of plain Python numbers.
  """
  boxes = np.asarray(boxes, np.float64)
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1).reshape(-1, 4)
  ids = np.repeat(np.asarray(image_ids, np.int64), scores.shape[1])
  return [
    {"image_id": i, "category_id": c, "bbox": b, "score": s}
    for i, c, b, s in zip(
      ids.tolist(),
      np.asarray(labels).reshape(-1).tolist(),
      xywh.tolist(),
      np.asarray(scores, np.float64).reshape(-1).tolist(),
    )
  ]


def class_metric_names(categories: dict[int, str]) -> dict[int, str]:
  """Category id -> the name of its AP in the metrics: ``AP/<class name>`` (``AP/<name>_<id>`` for
  a name that several ids share), in id order."""
  names = list(categories.values())
  return {
    cid: f"AP/{name}" if names.count(name) == 1 else f"AP/{name}_{cid}"
    for cid, name in sorted(categories.items())
  }


def _per_class_ap(coco_eval: COCOeval) -> dict[int, float]:
  """Category id -> AP at IoU .50:.95, all areas, 100 detections (-1 without ground truth): the mean
  of ``COCOeval.eval['precision']`` (T, R, K, A, M) over its valid entries, as ``summarize`` takes
  AP."""
  precision = coco_eval.eval["precision"][:, :, :, coco_eval.params.areaRngLbl.index("all"), -1]
  out = {}
  for k, cid in enumerate(coco_eval.params.catIds):
    valid = precision[:, :, k][precision[:, :, k] > -1]
    out[int(cid)] = float(valid.mean()) if valid.size else -1.0
  return out


def _class_table(per_class: dict[int, float], categories: dict[int, str]) -> str:
  """The per-class AP as printed after pycocotools' table: one line per category."""
  width = max([len(name) for name in categories.values()] + [5])
  lines = [
    "Per-class AP @[ IoU=0.50:0.95 | area=all | maxDets=100 ]:",
    f"  {'id':>4}  {'class':<{width}}  AP",
  ]
  lines += [
    f"  {cid:>4}  {categories[cid]:<{width}}  {ap:.3f}"
    if ap >= 0
    else f"  {cid:>4}  {categories[cid]:<{width}}  - (no ground truth)"
    for cid, ap in per_class.items()
  ]
  return "\n".join(lines) + "\n"


def coco_metrics(
  ann_path: str, results: list[dict[str, Any]], image_ids: Sequence[int]
) -> tuple[dict[str, float], str]:
  """pycocotools' bbox evaluation of ``results`` against the ground truth json.

  Args:
    ann_path: the COCO-format ground truth json.
    results: detections in COCO results format (``to_coco_results``); pycocotools adds keys to them.
    image_ids: the images that were evaluated: they must be exactly the json's images.

  Returns:
    ``METRIC_NAMES`` -> value, then each category's AP (``class_metric_names``: ``AP/<name>``); the
    summary table that ``COCOeval.summarize`` prints, followed by the per-class table.

  Raises:
    ValueError: the evaluated images are not exactly the json's images.
  """
  gt = COCO()  # filled from the json's text: pycocotools opens local files only
  gt.dataset = json.loads(storage.read_bytes(ann_path))
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    gt.createIndex()
  expected, got = set(gt.getImgIds()), set(int(i) for i in image_ids)
  if expected != got:
    raise ValueError(
      f"evaluated {len(got)} images but {ann_path} lists {len(expected)}: "
      f"{len(expected - got)} not evaluated (e.g. {sorted(expected - got)[:5]}), "
      f"{len(got - expected)} not in the json (e.g. {sorted(got - expected)[:5]})"
    )
  with contextlib.redirect_stdout(io.StringIO()):
    detections = gt.loadRes(results)
    coco_eval = COCOeval(gt, detections, "bbox")
    coco_eval.params.imgIds = sorted(expected)
    coco_eval.evaluate()
    coco_eval.accumulate()
  table = io.StringIO()
  with contextlib.redirect_stdout(table):
    coco_eval.summarize()
  categories = {int(c["id"]): c["name"] for c in gt.loadCats(gt.getCatIds())}
  per_class = _per_class_ap(coco_eval)
  metrics = dict(zip(METRIC_NAMES, (float(v) for v in coco_eval.stats)))
  metrics.update({name: per_class[cid] for cid, name in class_metric_names(categories).items()})
  return metrics, table.getvalue() + _class_table(per_class, categories)


def _checked_int32(image_ids: np.ndarray) -> np.ndarray:
  """Image ids travel through the devices as int32 (JAX's default integer width)."""
  if image_ids.size and image_ids.max() > _INT32_MAX:
    raise ValueError(f"image id {image_ids.max()} does not fit in int32")
  return image_ids.astype(np.int32)


def gather_detections(
  config: ml_collections.ConfigDict,
  model: flax.linen.Module,
  variables: Any,
  mesh: jax.sharding.Mesh,
  split: str = "val",
) -> dict[str, np.ndarray]:
  """The detections of every image of ``split``, gathered to every process.

  Collective: every process must call it. Blank examples (``valid`` False) are dropped.

  Args:
    config: the run config (``eval_per_device_batch_size``, ``evaluation.top_k``, dataset).
    model: the detector.
    variables: ``{'params', 'batch_stats'}``, host arrays or global arrays on ``mesh``.
    mesh: the device mesh; batches are split over its ``data`` axis.
    split: 'val' or 'train'.

  Returns:
    ``image_id`` (N,) int64, ``scores`` (N, K), ``labels`` (N, K), ``boxes`` (N, K, 4) absolute
    xyxy in original-image pixels, sorted by image id.

  Raises:
    RuntimeError: an image came back more than once (the data sharding is broken).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  variables = sharding.replicate(variables, mesh)
  global_batch_size = config.eval_per_device_batch_size * mesh.size
  k = top_k(config)
  pending = []
  report = progress.Progress(
    f"evaluating the {len(coco.load_split(config, split))} {split} images",
    data.eval_steps(config, global_batch_size, split),
    unit="batches",
  )
  for batch in data.eval_iterator(config, global_batch_size=global_batch_size, split=split):
    inputs = dict(
      {key: batch[key] for key in batch_spec.EVAL_KEYS}, image_id=_checked_int32(batch["image_id"])
    )
    # Dispatched without waiting: the next batch is read while this one runs.
    pending.append(
      predict_batch(variables, data.to_global_arrays(inputs, batch_sharding), model=model, k=k)
    )
    report.update(len(pending), pending[-1])
  if not pending:
    raise ValueError(f"the {split} split has no images")
  gathered = [multihost_utils.process_allgather(dets, tiled=True) for dets in pending]
  merged = {key: np.concatenate([g[key] for g in gathered]) for key in gathered[0]}
  valid = merged.pop("valid")
  merged = {key: v[valid] for key, v in merged.items()}
  ids = merged["image_id"].astype(np.int64)
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise RuntimeError(f"images evaluated more than once: {unique[counts > 1][:5].tolist()}")
  order = np.argsort(ids, kind="stable")
  return dict({key: v[order] for key, v in merged.items()}, image_id=ids[order])


def run_evaluation(
  config: ml_collections.ConfigDict,
  model: flax.linen.Module,
  variables: Any,
  mesh: jax.sharding.Mesh,
  *,
  split: str = "val",
  detections_path: str | None = None,
) -> EvalResult:
  """COCO bbox evaluation of ``split``; collective (every process calls it).

  Args:
    config: the run config.
    model: the detector.
    variables: ``{'params', 'batch_stats'}``.
    mesh: the device mesh (``data`` axis).
    split: 'val' or 'train'.
    detections_path: if given, process 0 writes the detections there in COCO results format.

  Returns:
    The metrics (on every process), the summary table (process 0) and the number of images.
  """
  dets = gather_detections(config, model, variables, mesh, split)
  # Every process knows the names (the split's json), so it can receive the values.
  names = METRIC_NAMES + tuple(
    class_metric_names(coco.load_split(config, split).categories).values()
  )
  stats = np.zeros(len(names), np.float64)
  summary = ""
  if jax.process_index() == 0:
    results = to_coco_results(dets["image_id"], dets["scores"], dets["labels"], dets["boxes"])
    if detections_path:
      storage.write_bytes(detections_path, json.dumps(results).encode())
    metrics, summary = coco_metrics(data.annotation_path(config, split), results, dets["image_id"])
    stats = np.array([metrics[name] for name in names], np.float64)
  # Sent as the float64 bits (JAX arrays are 32-bit by default), so every process gets the exact
  # values.
  stats = np.asarray(multihost_utils.broadcast_one_to_all(stats.view(np.uint32))).view(np.float64)
  return EvalResult(
    metrics=dict(zip(names, stats.tolist())), summary=summary, num_images=len(dets["image_id"])
  )


def evaluate(
  config: ml_collections.ConfigDict,
  model: flax.linen.Module,
  variables: Any,
  mesh: jax.sharding.Mesh,
  *,
  step: int | None = None,
  split: str = "val",
) -> dict[str, float]:
  """The 12 COCO box metrics of ``split`` (``METRIC_NAMES``), the same on every process.

  Collective: every process calls it. The summary table is logged on process 0, with ``step``.
  """
  result = run_evaluation(config, model, variables, mesh, split=split)
  if jax.process_index() == 0:
    logging.info(
      "COCO bbox evaluation of %d %s images%s:\n%s",
      result.num_images,
      split,
      "" if step is None else f" at step {step}",
      result.summary,
    )
  return result.metrics


def _to_host(x: Any) -> np.ndarray:
  """A numpy copy of a host array or a (possibly multi-host) jax.Array; collective for the
  latter."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def detect_image(
  variables: Any, loaded: image_files.LoadedImage, *, model: flax.linen.Module, k: int
) -> dict[str, np.ndarray]:
  """The detections of one prepared image (``image_files``), padded only to ``size_divisibility``.

  predict.py, the Python API and the drawings after training all detect through here. Batched
  evaluation pads an image to its size bucket instead, which gives the same detections when the
  backbone masks the padding (``model.mask_padding``: by default in evaluation) and can move them
  otherwise.

  Returns:
    ``scores`` (k,) decreasing, ``labels`` (k,), ``boxes`` (k, 4) xyxy in the image's own pixels.
  """
  batch = {"image": loaded.image, "pad_mask": loaded.pad_mask, "orig_size": loaded.orig_size}
  dets = jax.device_get(predict_batch(variables, batch, model=model, k=k))
  return {name: np.asarray(dets[name][0]) for name in ("scores", "labels", "boxes")}


def write_prediction_images(
  config: ml_collections.ConfigDict,
  model: flax.linen.Module,
  variables: Any,
  out_dir: "str | os.PathLike[str]",
  num_images: int,
  *,
  split: str = "val",
) -> list[str]:
  """Draws the detections of the first ``num_images`` images of ``split`` (by id) to
  ``out_dir/<file name>.png``, as predict.py draws them: the same detections (``detect_image``) and
  drawing (``visualize``), with those scoring at least ``config.evaluation.score_threshold``.

  Call it on every process (it gathers ``variables`` to the hosts); process 0 runs the model on
  its first local device and writes the files.

  Returns:
    The paths written (empty on processes other than 0).
  """
  variables = jax.tree.map(_to_host, variables)
  if jax.process_index() != 0 or num_images <= 0:
    return []
  variables = jax.device_put(variables, jax.local_devices()[0])
  names = data.category_names(config)
  images = coco.load_split(config, split)
  paths = []
  for i in range(min(num_images, len(images))):
    source = images.path(i)
    loaded = image_files.load_image(source, config)
    dets = detect_image(variables, loaded, model=model, k=top_k(config))
    path = os.fspath(
      storage.path(out_dir) / (os.path.splitext(os.path.basename(source))[0] + ".png")
    )
    visualize.save_detections_png(
      path, loaded.pixels, dets, names, config.evaluation.score_threshold
    )
    paths.append(path)
  return paths
