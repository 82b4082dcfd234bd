"""Exports (conddetr_jax/export/): each artifact, loaded in a fresh process that imports neither
conddetr_jax nor flax, answers what the JAX model answers, at two batch sizes, on the test model
and (slow) on R50 at a small size.

The test model is configs/test_tiny.py with a landscape and a portrait bucket (64x96, 96x64) and
its class bias zeroed, so that its scores spread around the 0.5 threshold (detections to compare).
"""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import matplotlib
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from conddetr_jax import models
from conddetr_jax.checkpoints import convert
from conddetr_jax.configs import r50, test_tiny
from conddetr_jax.data import transforms
from conddetr_jax.evaluation import postprocess
from conddetr_jax.export import forward, saved_model, stablehlo, verify, writer
from conddetr_jax.export import onnx as onnx_export
from conddetr_jax.inference import prediction

PHOTO = os.path.join(
  os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"
)
# Crops of the photo (left, top, right, bottom): landscape, portrait, the whole, a small square.
CROPS = ((0, 100, 512, 380), (100, 0, 330, 600), (0, 0, 512, 600), (200, 150, 260, 210))
# What the fresh process may not have loaded.
FORBIDDEN = "[m for m in ('conddetr_jax', 'flax') if m in sys.modules]"


@dataclasses.dataclass
class Model:
  """A config, its random-init variables (class bias zeroed) and a folder for what is written of it
  once for the module: the inputs of the program tests and the SavedModel."""

  config: ml_collections.ConfigDict
  variables: Any
  root: pathlib.Path

  @functools.cached_property
  def program_inputs(self) -> tuple[str, dict]:
    """Padded batches of 3 and of 1 image per bucket, saved for the fresh process (their path);
    the JAX outputs of each (key ``<H>x<W>_<batch>``)."""
    pixels = verify.sample_images(count=3)
    weights, treedef = forward.flat_weights(self.variables)
    run = jax.jit(forward.forward_fn(self.config, treedef))
    inputs, expected = {}, {}
    for h, w in forward.buckets(self.config):
      image, pad_mask, _ = forward.padded_batch(
        verify.fitting(pixels, self.config, (h, w)), self.config, (h, w)
      )
      for batch in (3, 1):
        key = f"{h}x{w}_{batch}"
        inputs[f"image_{key}"], inputs[f"mask_{key}"] = image[:batch], pad_mask[:batch]
        expected[key] = [np.asarray(x) for x in run(weights, image[:batch], pad_mask[:batch])]
    path = str(self.root / "inputs.npz")
    np.savez(path, **inputs)
    return path, expected

  @functools.cached_property
  def saved_model(self) -> str:
    """The model written as a SavedModel."""
    folder = str(self.root / "saved_model")
    saved_model.write(self.config, self.variables, folder)
    return folder


def random_model(config: ml_collections.ConfigDict, root: pathlib.Path) -> Model:
  """``config``'s model with random-init variables (``convert.init_variables``), class bias 0."""
  variables = jax.tree_util.tree_map(np.asarray, convert.init_variables(config))
  variables["params"]["class_embed"]["bias"] = np.zeros_like(
    variables["params"]["class_embed"]["bias"]
  )
  return Model(config, variables, root)


@pytest.fixture(name="tiny", scope="module")
def fixture_tiny(tmp_path_factory) -> Model:
  """The test model (the module docstring)."""
  config = test_tiny.get_config()
  config.dataset.update(eval_size=64, eval_max_size=96)
  return random_model(config, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(name="r50_small", scope="module")
def fixture_r50_small(tmp_path_factory) -> Model:
  """R50 at a small size: one 128x128 bucket, which the sample images (about 170x185) resized by
  the original's rule (to 128 on the longer side) fit."""
  config = r50.get_config()
  config.dataset.update(eval_size=128, eval_max_size=128)
  return random_model(config, tmp_path_factory.mktemp("r50_small"))


@pytest.fixture(name="model", params=["tiny", pytest.param("r50_small", marks=pytest.mark.slow)])
def fixture_model(request) -> Model:
  """Each model the exports are checked on, in turn."""
  return request.getfixturevalue(request.param)


def run_fresh(script: str, *args: str) -> dict:
  """Runs ``script`` in a new Python (not on this checkout's path); returns the JSON it prints
  last."""
  out = subprocess.run(
    [sys.executable, "-c", script, *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(args[0]),
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


def check_programs(model: Model, folder: str, script: str) -> None:
  """``script``, run fresh on the program inputs and ``folder``, gives the JAX outputs."""
  path, expected = model.program_inputs
  got = run_fresh(script, path, folder)
  assert got.pop("loaded") == []
  assert sorted(got) == sorted(expected)
  for key, (logits, boxes) in expected.items():
    assert np.abs(np.array(got[key][0]) - logits).max() <= 1e-4, key
    assert np.abs(np.array(got[key][1]) - boxes).max() <= 1e-4, key


STABLEHLO_SCRIPT = f"""
import json, os, sys
import numpy as np
from jax import export
inputs, folder = np.load(sys.argv[1]), sys.argv[2]
with np.load(os.path.join(folder, "weights.npz")) as w:
  weights = [w[k] for k in sorted(w.files)]
out = {{}}
for name in inputs.files:
  if name.startswith("image_"):
    key = name[len("image_"):]
    with open(os.path.join(folder, f"forward_{{key.split('_')[0]}}.jax_export"), "rb") as f:
      program = export.deserialize(f.read())
    out[key] = [np.asarray(x).tolist()
                for x in program.call(weights, inputs[name], inputs["mask_" + key])]
out["loaded"] = {FORBIDDEN}
print(json.dumps(out))
"""


def test_stablehlo_loads_with_jax_alone_and_gives_the_model_s_outputs_at_two_batch_sizes(
  model, tmp_path
):
  folder = str(tmp_path / "stablehlo")
  stablehlo.write(model.config, model.variables, folder)
  check_programs(model, folder, STABLEHLO_SCRIPT)


ONNX_SCRIPT = f"""
import json, os, sys
import numpy as np
import onnxruntime
inputs, folder = np.load(sys.argv[1]), sys.argv[2]
out = {{}}
for name in inputs.files:
  if name.startswith("image_"):
    key = name[len("image_"):]
    session = onnxruntime.InferenceSession(
        os.path.join(folder, f"model_{{key.split('_')[0]}}.onnx"))
    out[key] = [x.tolist() for x in session.run(
        ["logits", "boxes"], {{"image": inputs[name], "pad_mask": inputs["mask_" + key]}})]
out["loaded"] = {FORBIDDEN}
print(json.dumps(out))
"""


def test_onnx_runs_in_onnxruntime_and_gives_the_model_s_outputs_at_two_batch_sizes(model, tmp_path):
  folder = str(tmp_path / "onnx")
  onnx_export.write(model.config, model.variables, folder)
  check_programs(model, folder, ONNX_SCRIPT)


SAVED_MODEL_SCRIPT = f"""
import json, sys
import tensorflow as tf
paths, folder = sys.argv[1:-1], sys.argv[-1]
model = tf.saved_model.load(folder)
serve = model.signatures["serving_default"]
images = [open(p, "rb").read() for p in paths]
def detect(batch, signature="serving_default", **kwargs):
  out = model.signatures[signature](images=tf.constant(batch, tf.string), **kwargs)
  return {{k: v.numpy().tolist() for k, v in out.items()}}
out = {{"batch": detect(images, score_threshold=tf.constant(0.5)),
        "single": detect(images[:1], score_threshold=tf.constant(0.5)),
        "default": detect(images[:1], "detect")}}
# Resized by the original's rule to 1x100: wider than the test model's largest bucket (96).
thin = tf.io.encode_png(tf.zeros([4, 400, 3], tf.uint8)).numpy()
for name, batch in (("not_an_image", [b"not an image"]), ("empty", []), ("too_thin", [thin])):
  try:
    detect(batch, score_threshold=tf.constant(0.5))
    out[name] = "no error"
  except tf.errors.InvalidArgumentError as e:
    out[name] = e.message
out["after_errors"] = detect(images[:1], score_threshold=tf.constant(0.5))
out["loaded"] = {FORBIDDEN}
print(json.dumps(out))
"""


SAVED_MODEL_PROGRAM_SCRIPT = f"""
import json, sys
import numpy as np
import tensorflow as tf
inputs, folder = np.load(sys.argv[1]), sys.argv[2]
model = tf.saved_model.load(folder)
out = {{}}
for name in inputs.files:
  if name.startswith("image_"):
    key = name[len("image_"):]
    got = model.signatures["model_" + key.split("_")[0]](
        image=tf.constant(inputs[name]), pad_mask=tf.constant(inputs["mask_" + key]))
    out[key] = [got["logits"].numpy().tolist(), got["boxes"].numpy().tolist()]
out["loaded"] = {FORBIDDEN}
print(json.dumps(out))
"""


def test_saved_model_s_model_signatures_give_the_model_s_outputs_at_two_batch_sizes(model):
  check_programs(model, model.saved_model, SAVED_MODEL_PROGRAM_SCRIPT)


@pytest.fixture(name="served", scope="module")
def fixture_served(tiny, tmp_path_factory):
  """The SavedModel's answers (fresh process) to photos as JPEG (and one PNG), and predict.py's."""
  root = tmp_path_factory.mktemp("saved_model")
  paths = []
  with Image.open(PHOTO) as photo:
    for i, crop in enumerate(CROPS):
      paths.append(str(root / f"crop{i}.{'png' if i == 3 else 'jpg'}"))
      photo.crop(crop).save(paths[-1], quality=85)
  served = run_fresh(SAVED_MODEL_SCRIPT, *paths, tiny.saved_model)
  records = prediction.predict_files(
    tiny.config,
    models.build_model(tiny.config),
    tiny.variables,
    paths,
    str(root / "predict"),
    threshold=0.5,
  )
  return served, records


def assert_same_detections(out, index, record):
  """Same count; every detection of predict.py's has one of the same label, score (1e-4) and box
  (0.5 px) (near-tied scores of the random test model may come in another order)."""
  n = out["num_detections"][index]
  assert n == len(record["detections"])
  unmatched = list(range(n))
  for d in record["detections"]:
    match = [
      j
      for j in unmatched
      if out["labels"][index][j] == d["label"]
      and abs(out["scores"][index][j] - d["score"]) <= 1e-4
      and np.abs(np.array(out["boxes"][index][j]) - d["box_xyxy"]).max() <= 0.5
    ]
    assert match, d
    unmatched.remove(match[0])
  assert not np.any(out["scores"][index][n:])  # the rest are zeros


def test_saved_model_detects_in_jpeg_photos_what_predict_py_detects(served):
  """Photos of different sizes batched together (so padded) detect as each alone in predict.py:
  the exported model masks its padding (config.model.mask_padding, docs/evaluation.md)."""
  out, records = served
  assert out["loaded"] == []
  assert 0 < sum(out["batch"]["num_detections"]) < len(records) * len(out["batch"]["scores"][0])
  for index, record in enumerate(records):
    assert_same_detections(out["batch"], index, record)
  assert_same_detections(out["single"], 0, records[0])
  assert out["default"] == out["single"]  # the config's threshold is 0.5


def test_saved_model_refuses_a_bad_request_clearly_and_keeps_serving(served):
  out, records = served
  assert "Unknown image file format" in out["not_an_image"]
  assert "expected at least one encoded image" in out["empty"]
  assert "larger than the largest bucket (96, 96)" in out["too_thin"]
  assert_same_detections(out["after_errors"], 0, records[0])


# ------------------------------------------------------------------------------ the pieces


def test_the_graph_s_resize_size_is_the_original_s():
  rng = np.random.default_rng(0)
  sizes = np.concatenate(
    [rng.integers(1, 3000, size=(200, 2)), [[480, 640], [800, 1200], [799, 1333], [64, 96]]]
  )
  resized = tf.function(transforms.eval_resized_size)
  for size, max_size in ((800, 1333), (64, 96)):
    expected = np.stack(transforms.resized_size(sizes[:, 0], sizes[:, 1], size, max_size), axis=1)
    got = np.stack([resized(tf.constant(hw, tf.int32), size, max_size).numpy() for hw in sizes])
    np.testing.assert_array_equal(got, expected)


def test_the_graph_s_postprocess_is_the_original_s():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 10, 7)).astype(np.float32)
  boxes = rng.uniform(0.1, 0.9, size=(2, 10, 4)).astype(np.float32)
  orig = np.array([[480, 640], [600, 512]], np.int32)
  expected = postprocess.postprocess({"pred_logits": logits, "pred_boxes": boxes}, orig, top_k=20)
  got = saved_model.postprocess(tf.constant(logits), tf.constant(boxes), tf.constant(orig), 20)
  np.testing.assert_array_equal(got["labels"].numpy(), expected["labels"])
  np.testing.assert_allclose(got["scores"].numpy(), expected["scores"], atol=1e-6)
  np.testing.assert_allclose(got["boxes"].numpy(), expected["boxes"], atol=1e-4)


def test_the_buckets_hold_every_evaluation_image_landscape_and_portrait():
  assert forward.buckets(r50.get_config()) == [(832, 1344), (1344, 832)]
  assert forward.bucket_of((800, 1066), [(832, 1344), (1344, 832)]) == 0
  assert forward.bucket_of((1333, 750), [(832, 1344), (1344, 832)]) == 1
  with pytest.raises(ValueError, match="fits none"):
    forward.bucket_of((900, 900), [(832, 1344), (1344, 832)])


def test_an_export_that_differs_from_the_model_is_an_error(tiny, tmp_path, monkeypatch):
  loaded = stablehlo.load
  monkeypatch.setattr(
    stablehlo,
    "load",
    lambda folder, size: (
      lambda image, pad_mask: [x + 1e-3 for x in loaded(folder, size)(image, pad_mask)]
    ),
  )
  with pytest.raises(
    ValueError, match="export check failed, stablehlo 64x96 logits and boxes vs JAX"
  ):
    writer.export(
      tiny.config,
      tiny.variables,
      str(tmp_path),
      ["stablehlo"],
      verify.sample_images(count=2),
      tolerance=1e-4,
    )
  with pytest.raises(ValueError, match="unknown"):
    writer.export(tiny.config, tiny.variables, str(tmp_path), ["tflite"], [], tolerance=1e-4)
