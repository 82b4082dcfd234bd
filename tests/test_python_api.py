"""The Python API: ``conddetr_jax.load_detector(config, checkpoint)`` and ``detector(images)``,
whose boxes are predict.py's, in the images' own pixels."""

import os
import re

import jax
import numpy as np
from PIL import Image
import pytest

import conddetr_jax
from conddetr_jax import data, models
from conddetr_jax.checkpoints import convert
from conddetr_jax.inference import api, prediction
from configs import test_tiny
from tests import processes


@pytest.fixture(scope="module", name="checkpoint")
def fixture_checkpoint(tmp_path_factory):
  """An Orbax checkpoint of a randomly initialised test_tiny model."""
  config = test_tiny.get_config()
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(0))
  return convert.save_variables(jax.device_get(variables), tmp_path_factory.mktemp("api") / "tiny")


def test_a_detector_answers_predict_py_s_detections_in_the_image_s_pixels(checkpoint, tmp_path):
  photo = tmp_path / "photo.png"
  pixels = np.random.default_rng(0).integers(
    0, 255, (70, 110, 3), np.uint8
  )  # 70 x 110: resized to 64 x 64
  Image.fromarray(pixels).save(photo)
  config = test_tiny.get_config()
  config.dataset.synthetic_dir = str(tmp_path / "shapes")  # class names come from its json
  data.prepare_dataset(config)
  detector = conddetr_jax.load_detector(config, checkpoint, threshold=0.0)
  boxes, scores, labels = detector(str(photo))
  assert boxes.shape == (detector.config.evaluation.top_k, 4) and np.all(np.diff(scores) <= 0)
  assert boxes[:, 2].max() > 64  # x in the file's 110-pixel width, not the model's 64-pixel input

  [record] = prediction.predict_files(
    config,
    models.build_model(config),
    detector._variables,  # pylint: disable=protected-access
    [str(photo)],
    str(tmp_path / "out"),
    0.0,
  )
  np.testing.assert_allclose(boxes, [d["box_xyxy"] for d in record["detections"]], rtol=1e-6)
  np.testing.assert_allclose(scores, [d["score"] for d in record["detections"]], rtol=1e-6)
  assert labels.tolist() == [d["label"] for d in record["detections"]]

  # A path, a PIL image and an array of the same pixels are the same image; a list gives a list.
  from_pil, from_array = detector([Image.fromarray(pixels), pixels])
  for got in (from_pil, from_array):
    np.testing.assert_array_equal(got.boxes, boxes)

  assert (
    detector.label_name(np.int32(2)) == "square" and detector.label_name(1) == "class 1"
  )  # no category 1
  detector.threshold = float(scores[3])
  assert len(detector(pixels).scores) == 4  # only those scoring at least the threshold


def test_load_detector_takes_a_config_name_file_or_dict_and_names_unknown_ones(checkpoint):
  assert api.get_config("r50").model.backbone == "resnet50"
  assert (
    api.get_config(os.path.join(processes.REPO, "configs", "demo.py")).model.backbone == "resnet18"
  )
  config = test_tiny.get_config()
  assert api.get_config(config) is config
  with pytest.raises(
    ValueError, match=r"config 'r5O': expected one of r50, r50_dc5, .* or a config file \(.py\)"
  ):
    conddetr_jax.load_detector("r5O", checkpoint)
  with pytest.raises(ValueError, match="does not fit the model of this config") as error:
    conddetr_jax.load_detector("demo", checkpoint)
  message = str(error.value)
  count = int(re.search(r"; (\d+) tensors differ:", message)[1])
  listed = message.split("tensors differ:\n")[1].splitlines()
  assert len(listed) == 12 and listed[10] == f"  ... and {count - 10} more"
  assert listed[11] == "It fits the model of configs/test_tiny.py."


def test_importing_the_package_loads_neither_jax_nor_tensorflow():
  # (conddetr_jax.load_detector, which loads them, is used by the tests above.)
  code = (
    "import sys, conddetr_jax; print([m for m in ('jax', 'tensorflow', 'flax') if m in "
    "sys.modules])"
  )
  out = processes.run_python_ok("-c", code, env=processes.cpu_env(), timeout=300)
  assert out.stdout.strip().splitlines()[-1] == "[]"
