"""Evaluation: COCO numbers as pycocotools computes them, every image once, boxes in original
pixels."""

from collections.abc import Callable
import json
import os
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from conddetr_jax import data, models, sharding, visualize
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.inference import prediction
from configs import test_tiny
from tests import conftest, processes


def tiny_config(root: str) -> ml_collections.ConfigDict:
  """The tiny model on 7 synthetic val images (64-96 px, resized to fit the one 64x64 bucket), in
  batches of 3: the last batch holds one image and two blanks."""
  config = test_tiny.get_config()
  config.dataset.update(synthetic_dir=root, synthetic_num_val=7)
  config.eval_per_device_batch_size = 3
  return config


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ml_collections.ConfigDict:
  config = tiny_config(str(tmp_path_factory.mktemp("synthetic")))
  data.prepare_dataset(config)
  return config


@pytest.fixture(scope="module")
def model_and_variables(config):
  model = models.build_model(config)
  return model, models.init_variables(model, jax.random.PRNGKey(0))


def gt_images(config) -> dict[int, dict]:
  with open(data.annotation_path(config, "val")) as f:
    return {im["id"]: im for im in json.load(f)["images"]}


def coco_eval_stats(ann_path: str, results) -> np.ndarray:
  """pycocotools run directly, as its own documentation shows."""
  gt = COCO(ann_path)
  coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
  coco_eval.evaluate()
  coco_eval.accumulate()
  coco_eval.summarize()
  return np.array(coco_eval.stats)


# ------------------------------------------------------------------------------------- COCO glue


def test_coco_results_are_xywh_with_one_entry_per_detection():
  boxes = np.array(
    [[[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]], [[1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.5, 9.0]]]
  )
  results = coco_eval.to_coco_results(
    np.array([5, 9]), np.array([[0.9, 0.1], [0.8, 0.7]]), np.array([[3, 4], [5, 6]]), boxes
  )
  assert results == [
    {
      "image_id": 5,
      "category_id": 3,
      "bbox": [10.0, 20.0, 30.0, 40.0],
      "score": pytest.approx(0.9),
    },
    {"image_id": 5, "category_id": 4, "bbox": [0.0, 0.0, 5.0, 5.0], "score": pytest.approx(0.1)},
    {"image_id": 9, "category_id": 5, "bbox": [1.0, 2.0, 2.0, 2.0], "score": pytest.approx(0.8)},
    {"image_id": 9, "category_id": 6, "bbox": [7.0, 7.0, 0.5, 2.0], "score": pytest.approx(0.7)},
  ]
  assert all(type(r["image_id"]) is int and type(r["score"]) is float for r in results)


def _jittered_results(content: dict, seed: int, spread: Callable[[int], float]) -> list[dict]:
  """Detections of every ground-truth box, each moved a little, plus one false positive per box.

  ``spread(rank)`` is the jitter's standard deviation, a fraction of the box's size, for the
  category of that rank (by id).
  """
  rng = np.random.default_rng(seed)
  rank = {c["id"]: i for i, c in enumerate(sorted(content["categories"], key=lambda c: c["id"]))}
  results = []
  for ann in content["annotations"]:
    x, y, w, h = ann["bbox"]
    jitter = rng.normal(0, spread(rank[ann["category_id"]]), 4) * [w, h, w, h]
    results.append(
      {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
        "score": float(rng.uniform(0.3, 1.0)),
      }
    )
    results.append(
      {
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "bbox": [x + w / 2, y + h / 2, w, h],
        "score": float(rng.uniform(0.0, 0.6)),
      }
    )
  return results


def test_metric_names_follow_cocoeval_stats_order_on_nontrivial_detections(config):
  """Jittered ground truth plus false positives: 12 distinct, non-trivial numbers."""
  ann_path = data.annotation_path(config, "val")
  with open(ann_path) as f:
    content = json.load(f)
  results = _jittered_results(content, seed=0, spread=lambda rank: 0.08)
  expected = coco_eval_stats(ann_path, [dict(r) for r in results])
  metrics, summary = coco_eval.coco_metrics(ann_path, results, list(gt_images(config)))
  assert [metrics[name] for name in coco_eval.METRIC_NAMES] == expected.tolist()
  assert 0.2 < metrics["AP"] < metrics["AP50"] < 1.0
  assert summary.count("Average Precision") == 6 and summary.count("Average Recall") == 6


def test_per_class_ap_is_pycocotools_ap_of_each_category_alone_named_from_the_json(config):
  ann_path = data.annotation_path(config, "val")
  with open(ann_path) as f:
    content = json.load(f)
  # Classes unequally found: each category's AP is its own.
  results = _jittered_results(content, seed=1, spread=lambda rank: 0.02 * (1 + rank))
  metrics, summary = coco_eval.coco_metrics(
    ann_path, [dict(r) for r in results], list(gt_images(config))
  )
  gt = COCO(ann_path)
  names = {c["id"]: c["name"] for c in content["categories"]}
  per_class = {}
  for cid in sorted(names):
    one = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
    one.params.catIds = [cid]  # pycocotools' own AP of this category alone
    one.evaluate()
    one.accumulate()
    one.summarize()
    per_class[f"AP/{names[cid]}"] = float(one.stats[0])
  assert {k: v for k, v in metrics.items() if k.startswith("AP/")} == pytest.approx(
    per_class, abs=1e-12
  )
  assert (
    len(set(round(v, 6) for v in per_class.values())) == len(per_class) > 1
  )  # distinct, non-trivial
  table = summary.split("Per-class AP")[1].splitlines()[2:]
  assert [line.split()[:2] for line in table] == [[str(cid), names[cid]] for cid in sorted(names)]
  assert [float(line.split()[2]) for line in table] == pytest.approx(
    [per_class[f"AP/{names[cid]}"] for cid in sorted(names)], abs=5e-4
  )


def test_coco_metrics_refuse_a_different_image_set(config):
  ids = list(gt_images(config))
  results = [{"image_id": ids[0], "category_id": 2, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5}]
  with pytest.raises(ValueError, match="1 not evaluated"):
    coco_eval.coco_metrics(data.annotation_path(config, "val"), results, ids[1:])


# ------------------------------------------------------------------------------ the whole evaluator


def test_evaluator_equals_pycocotools_on_its_detections_file(config, model_and_variables, tmp_path):
  model, variables = model_and_variables
  path = str(tmp_path / "detections.json")
  result = coco_eval.run_evaluation(
    config, model, variables, sharding.make_mesh(), detections_path=path
  )
  with open(path) as f:
    results = json.load(f)
  expected = coco_eval_stats(data.annotation_path(config, "val"), results)
  assert [result.metrics[name] for name in coco_eval.METRIC_NAMES] == expected.tolist()
  assert result.num_images == 7 and "Average Precision" in result.summary
  # top_k = min(100, queries x classes) detections for every image, and no other image.
  k = coco_eval.top_k(config)
  ids = [r["image_id"] for r in results]
  assert k == 100 and len(results) == 7 * k and sorted(set(ids)) == sorted(gt_images(config))
  assert all(ids.count(i) == k for i in set(ids))


def test_every_image_once_and_outputs_independent_of_batch_size(config, model_and_variables):
  """7 images in batches of 1 and of 3 (the last batch part blank): the same detections.

  Each image is padded to its size bucket whatever its batch mates (one bucket here; see
  docs/evaluation.md for images that share a leftover batch with images of another bucket).
  """
  model, variables = model_and_variables
  mesh = sharding.make_mesh()
  one, three = (
    coco_eval.gather_detections(_with_batch_size(config, b), model, variables, mesh) for b in (1, 3)
  )
  for dets in (one, three):
    assert dets["image_id"].tolist() == sorted(gt_images(config))
    assert dets["scores"].shape == (7, 100) and dets["boxes"].shape == (7, 100, 4)
  np.testing.assert_allclose(three["scores"], one["scores"], atol=1e-5)
  np.testing.assert_allclose(three["boxes"], one["boxes"], atol=1e-4)
  np.testing.assert_array_equal(three["labels"], one["labels"])


def _with_batch_size(config, batch_size: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.eval_per_device_batch_size = batch_size
  return config


class _FixedBoxes(nn.Module):
  """Stands in for the detector: every query predicts the left half of the unpadded image, with
  class 2 most likely, whatever the input."""

  num_queries: int = 10
  num_classes: int = 10

  @nn.compact
  def __call__(self, images, pad_mask, train=False):
    del pad_mask, train
    batch = images.shape[0]
    logits = jnp.where(jnp.arange(self.num_classes) == 2, 4.0, -4.0)
    logits = jnp.broadcast_to(logits, (batch, self.num_queries, self.num_classes))
    boxes = jnp.broadcast_to(jnp.array([0.25, 0.5, 0.5, 1.0]), (batch, self.num_queries, 4))
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_boxes_are_in_original_image_pixels(config):
  """The model's normalised box of the resized image maps onto the original image's pixels."""
  dets = coco_eval.gather_detections(config, _FixedBoxes(), {}, sharding.make_mesh())
  images = gt_images(config)
  assert dets["image_id"].tolist() == sorted(images)
  for image_id, boxes, labels in zip(dets["image_id"], dets["boxes"], dets["labels"]):
    h, w = images[int(image_id)]["height"], images[int(image_id)]["width"]
    assert (labels[:10] == 2).all()
    np.testing.assert_allclose(boxes, np.tile([0.0, 0.0, w / 2, h], (len(boxes), 1)), rtol=1e-6)


# ------------------------------------------------------------------------------------ drawing


def test_prediction_images_are_the_val_files_drawn_as_predict_draws_them(
  config, model_and_variables, tmp_path
):
  model, variables = model_and_variables
  config = config.copy_and_resolve_references()
  config.evaluation.score_threshold = 0.0  # random weights score low: draw everything
  paths = coco_eval.write_prediction_images(config, model, variables, str(tmp_path), 4)
  names = [f"{i:012d}" for i in range(1, 5)]  # the val images' file names
  assert [os.path.basename(p) for p in paths] == [f"{n}.png" for n in names]
  images = {os.path.splitext(im["file_name"])[0]: im for im in gt_images(config).values()}
  for name, path in zip(names, paths):
    h, w = images[name]["height"], images[name]["width"]
    scale = 512 // max(h, w)  # the file's own pixels, enlarged to about 512 px, as predict.py
    with Image.open(path) as png:
      assert png.format == "PNG" and png.size == (w * scale, h * scale)


def test_prediction_images_detect_and_draw_each_image_as_predict_py_does(
  config, tmp_path, monkeypatch
):
  # Evaluation batches pad an image to its size bucket, which moves scores slightly; the drawings
  # must show predict.py's detections of the file instead, so both go through detect_image.
  seen = []

  def fake_detect(variables, loaded, *, model, k):
    del variables, model
    seen.append(loaded.image.shape)
    h, w = loaded.orig_size[0]
    boxes = np.tile(np.array([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]], np.float32), (k, 1))
    return {
      "scores": np.linspace(0.9, 0.1, k, dtype=np.float32),
      "labels": np.arange(k) % 3 + 1,
      "boxes": boxes,
    }

  monkeypatch.setattr(coco_eval, "detect_image", fake_detect)
  [drawn] = coco_eval.write_prediction_images(config, None, {}, str(tmp_path / "train"), 1)
  val_file = os.path.join(
    config.dataset.synthetic_dir, "val2017", os.path.basename(drawn).replace(".png", ".jpg")
  )
  [record] = prediction.predict_files(
    config, None, {}, [val_file], str(tmp_path / "predict"), config.evaluation.score_threshold
  )
  assert (
    len(seen) == 2 and seen[0] == seen[1]
  )  # one image, padded only to size_divisibility, both times
  with open(drawn, "rb") as a, open(record["png"], "rb") as b:
    assert a.read() == b.read()


def test_draw_detections_draws_only_boxes_above_the_threshold():
  image = np.zeros((80, 100, 3), np.uint8)
  boxes = np.array([[10.0, 50.0, 30.0, 70.0], [60.0, 5.0, 90.0, 20.0]])
  scores, labels = np.array([0.9, 0.2]), np.array([2, 5])
  drawn = np.asarray(
    visualize.draw_detections(image, boxes, scores, labels, {2: "square"}, threshold=0.5)
  )
  assert drawn.shape == (80, 100, 3)
  assert drawn[60, 10].any() and drawn[70, 20].any()  # the kept box's left and bottom edges
  assert drawn[40:49, 12:40].any()  # its caption, above it
  assert not drawn[:30, 55:].any()  # the low-scoring box is absent
  scaled = np.asarray(visualize.draw_detections(image, boxes, scores, labels, {}, scale=3))
  assert scaled.shape == (240, 300, 3) and scaled[180, 30].any() and not scaled[180, 33].any()


def test_boxes_are_clipped_and_captions_kept_inside_the_picture():
  image = np.zeros((80, 100, 3), np.uint8)
  # A box past the right and bottom edges, and one past the top-left corner.
  boxes = np.array([[70.0, 60.0, 130.0, 95.0], [-20.0, -10.0, 30.0, 25.0]])
  scores, labels = np.array([0.9, 0.8]), np.array([2, 5])
  names = {2: "square", 5: "disc"}
  drawn = np.asarray(visualize.draw_detections(image, boxes, scores, labels, names))
  assert drawn[70, 99].any() and drawn[79, 85].any()  # clipped edges on the last column and row
  assert drawn[15, 0].any() and drawn[0, 20].any()  # ... and on the first
  # Each caption is whole: the box it sits in (filled with the class colour) lies inside the image.
  for box, label in zip(boxes, labels):
    x0, y0, _, _ = visualize.clip_box(box, 80, 100)
    text_w, text_h = 60, 13  # larger than PIL's default font's "square 0.90" and "disc 0.80"
    tx, ty = visualize.caption_origin(x0, y0, text_w, text_h, 80, 100)
    assert 0 <= tx and tx + text_w <= 99 and 0 <= ty and ty + text_h <= 79
  # The right-edge box's caption was shifted left, so its text starts inside the picture.
  square = np.all(drawn == visualize._PALETTE[2 % len(visualize._PALETTE)], axis=-1)  # pylint: disable=protected-access
  assert square[:, :70].any() and not square[:, 100:].any()
  assert visualize.clip_box(np.array([-5.0, 3.0, 500.0, 60.0]), 50, 40) == (0.0, 3.0, 39.0, 49.0)


# ---------------------------------------------------------------------------- several processes

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        "127.0.0.1:" + sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from conddetr_jax import models
    from conddetr_jax.evaluation import coco_eval
    from conddetr_jax import sharding
    from tests import test_evaluation
    config = test_evaluation.tiny_config(sys.argv[3])
    model = models.build_model(config)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    result = coco_eval.run_evaluation(config, model, variables, sharding.make_mesh(),
                                       detections_path=sys.argv[4])
    print("METRICS" + json.dumps([jax.device_count(), result.num_images, result.metrics]))
""")


@pytest.mark.slow
def test_two_processes_of_two_devices_give_the_single_device_numbers(
  config, model_and_variables, tmp_path
):
  model, variables = model_and_variables
  single = coco_eval.run_evaluation(
    config, model, variables, sharding.make_mesh(), detections_path=str(tmp_path / "single.json")
  )
  port = str(20000 + os.getpid() % 20000)
  env = processes.cpu_env(XLA_FLAGS=conftest.cpu_devices_xla_flags(2), PYTHONPATH=processes.REPO)
  argvs = [
    ["-c", _WORKER, port, str(i), config.dataset.synthetic_dir, str(tmp_path / f"multi{i}.json")]
    for i in range(2)
  ]
  procs = processes.run_python_together(argvs, env, timeout=600)
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
  reports = [
    json.loads(line[len("METRICS") :])
    for p in procs
    for line in p.stdout.splitlines()
    if line.startswith("METRICS")
  ]
  assert len(reports) == 2
  for device_count, num_images, metrics in reports:
    assert device_count == 4 and num_images == 7  # global batch 12 > 7 images: 5 blank examples
    assert metrics.keys() == single.metrics.keys()
    np.testing.assert_allclose(
      [metrics[k] for k in coco_eval.METRIC_NAMES],
      [single.metrics[k] for k in coco_eval.METRIC_NAMES],
      atol=1e-6,
    )
  assert (tmp_path / "multi0.json").exists() and not (tmp_path / "multi1.json").exists()
  with open(tmp_path / "multi0.json") as f, open(tmp_path / "single.json") as g:
    multi, ref = json.load(f), json.load(g)
  assert [(r["image_id"], r["category_id"]) for r in multi] == [
    (r["image_id"], r["category_id"]) for r in ref
  ]
  np.testing.assert_allclose([r["bbox"] for r in multi], [r["bbox"] for r in ref], atol=1e-3)
