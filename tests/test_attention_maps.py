"""The conditional cross-attention's maps per head (the paper's Figure 1), from the model to files.

The combined weights are HF ConditionalDetr's (`output_attentions=True`) with the same weights; the
content and spatial logits sum to the combined ones; each part is its own softmax over the valid
keys; nothing of it is in the train and eval programs; predict.py --attention and
``Detector.attention`` give the maps of each detection.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import conddetr_jax
from conddetr_jax import models
from conddetr_jax.checkpoints import convert
from conddetr_jax.inference import attention_maps
from conddetr_jax.models.backbone import ResNet
from conddetr_jax.models.transformer import Encoder
from configs import default, test_tiny
from tests import hf_reference, processes

SMALL = dict(encoder_layers=2, decoder_layers=3, num_queries=20)


def _parts(sown: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """A recording layer's intermediates -> part -> (logits, weights), each (B, heads, Q, L)."""
  combined = sown["cross_attn"]
  return {
    "combined": (np.asarray(combined["logits"][0]), np.asarray(combined["weights"][0])),
    **{
      part: (np.asarray(sown[f"{part}_logits"][0]), np.asarray(sown[f"{part}_weights"][0]))
      for part in ("content", "spatial")
    },
  }


@functools.lru_cache(maxsize=None)
def reference():
  """HF's model (strong random weights, 3 decoder layers), our variables of it, a padded batch,
  HF's backbone features, encoder memory and cross-attention weights of it."""
  ref = hf_reference.build_reference("resnet50", seed=3, **SMALL)
  config = default.get_config()
  config.model.update(enc_layers=2, dec_layers=3, num_queries=20, dropout=0.0)
  variables = convert.from_torch(hf_reference.original_state_dict(ref), config)
  images, pad_mask = hf_reference.padded_batch(((128, 160), (96, 112)))  # the second one padded
  stages = hf_reference.run_reference(ref, images, pad_mask)
  weights = hf_reference.cross_attention_weights(ref, images, pad_mask)
  return config, variables, images, pad_mask, stages, weights


@functools.lru_cache(maxsize=None)
def recorded(layer: int) -> tuple[dict, np.ndarray]:
  """Our recording of decoder ``layer`` fed with the reference's own backbone features and encoder
  memory, so that the decoder alone is compared (float32 rounding of the stages before it,
  amplified by the reference's sharp attention, is ~1e-5 of the weights: test_parity.py), and the
  feature mask (B, h*w)."""
  config, variables, images, pad_mask, stages, _ = reference()
  model = models.build_model(config).clone(cross_attention_layer=layer)
  given = {ResNet: stages["backbone_features"], Encoder: stages["memory"]}

  def use_reference_stages(next_fun, args, kwargs, context):
    if type(context.module) in given and context.method_name == "__call__":
      return jnp.asarray(given[type(context.module)])
    return next_fun(*args, **kwargs)

  def forward(variables, images, pad_mask):
    with nn.intercept_methods(use_reference_stages):
      return model.apply(variables, images, pad_mask, mutable=["intermediates"])[1]["intermediates"]

  sown = jax.jit(forward)(variables, images, pad_mask)
  mask = np.asarray(sown["feature_mask"][0])
  return _parts(sown["decoder"][f"layers_{layer}"]), mask.reshape(mask.shape[0], -1)


@pytest.mark.parametrize("layer", [0, 2])  # the first (ca_qpos_proj) and the last
def test_combined_weights_equal_hugging_face_s_cross_attentions_on_a_padded_image(layer):
  parts, mask = recorded(layer)
  hf_weights = reference()[-1][layer]
  assert mask[1].any() and not mask[0].any()
  assert parts["combined"][1].shape == hf_weights.shape
  np.testing.assert_allclose(parts["combined"][1], hf_weights, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 2])
def test_content_and_spatial_logits_sum_to_the_combined_logits(layer):
  parts, _ = recorded(layer)
  combined, content, spatial = (parts[p][0] for p in ("combined", "content", "spatial"))
  scale = np.abs(combined).max()
  # Both parts matter (neither is the whole), and together they are the model's logits.
  assert np.abs(content).max() > 0.1 * scale and np.abs(spatial).max() > 0.1 * scale
  np.testing.assert_allclose(content + spatial, combined, rtol=0, atol=1e-5 * scale)


def test_each_part_is_its_own_softmax_over_the_valid_keys():
  parts, mask = recorded(2)
  padded = mask[:, None, None, :]  # (B, 1, 1, L)
  for part, (logits, weights) in parts.items():
    assert (weights[np.broadcast_to(padded, weights.shape)] == 0).all(), part
    shifted = np.where(padded, -np.inf, logits.astype(np.float64))
    shifted = np.exp(shifted - shifted.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(
      weights, shifted / shifted.sum(axis=-1, keepdims=True), rtol=0, atol=1e-6, err_msg=part
    )


def _lowered_texts(config, model) -> tuple[str, str, str]:
  """The StableHLO of the eval forward, the train gradient, and the forward that collects
  intermediates, for one 64x64 image."""
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(0))
  image, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  rngs = {"dropout": jax.random.PRNGKey(1)}

  def loss(params):
    out = model.apply({**variables, "params": params}, image, mask, train=True, rngs=rngs)
    return out["pred_logits"].sum() + out["pred_boxes"].sum()

  evaluate = jax.jit(lambda v: model.apply(v, image, mask, train=False)).lower(variables)
  train = jax.jit(jax.grad(loss)).lower(variables["params"])
  collect = jax.jit(lambda v: model.apply(v, image, mask, mutable=["intermediates"]))
  collect = collect.lower(variables)
  return evaluate.as_text(), train.as_text(), collect.as_text()


def test_the_train_and_eval_programs_are_unchanged_unless_the_maps_are_collected():
  config = test_tiny.get_config()
  config.model.attention = "blockwise"  # the recording layer runs dense: a leak would show
  plain = models.build_model(config)
  assert plain.cross_attention_layer is None  # off by default
  plain_eval, plain_train, plain_collect = _lowered_texts(config, plain)
  asked = plain.clone(cross_attention_layer=-1)
  asked_eval, asked_train, asked_collect = _lowered_texts(config, asked)
  assert asked_eval == plain_eval
  assert asked_train == plain_train
  assert asked_collect != plain_collect  # where the maps are collected, the program has them


def test_collecting_the_maps_leaves_the_detections_as_they_are():
  config = test_tiny.get_config()
  plain = models.build_model(config)
  variables = models.init_variables(plain, jax.random.PRNGKey(0))
  image = jax.random.normal(jax.random.PRNGKey(2), (1, 64, 64, 3))
  mask = jnp.zeros((1, 64, 64), bool).at[:, :, 40:].set(True)
  out = plain.apply(variables, image, mask)
  recording, _ = plain.clone(cross_attention_layer=0).apply(
    variables, image, mask, mutable=["intermediates"]
  )
  for name in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(recording[name], out[name], rtol=1e-6, atol=1e-6)


def test_a_layer_the_decoder_lacks_or_the_detr_decoder_is_an_error():
  config = test_tiny.get_config()  # 2 decoder layers
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(0))
  image, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  with pytest.raises(ValueError, match="decoder layer 2 to record: there are 2 layers"):
    models.build_model(config).clone(cross_attention_layer=2).apply(variables, image, mask)
  config.model.decoder = "detr"
  detr = models.build_model(config).clone(cross_attention_layer=-1)
  with pytest.raises(ValueError, match="DETR decoder has no conditional spatial query"):
    detr.init(jax.random.PRNGKey(0), image, mask)


def test_upsampling_puts_each_cell_s_value_at_its_centre_in_the_image_s_pixels():
  cells = np.zeros((1, 3, 4), np.float32)
  cells[0, 1, 2] = 1.0
  # Cells of 10 x 20 pixels; the image (25 x 70) ends inside the last row and column of cells.
  maps = attention_maps.upsample(cells, (25, 70), (10.0, 20.0))
  assert maps.shape == (1, 25, 70)
  peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
  assert peak in {(14, 49), (14, 50), (15, 49), (15, 50)}
  assert maps[0, :, :30].max() == 0 and maps[0, 24, :].max() < maps[0, 15, 50]


@pytest.fixture(scope="module", name="checkpoint")
def fixture_checkpoint(tmp_path_factory):
  """An Orbax checkpoint of a randomly initialised test_tiny model, and a 70 x 110 image file."""
  config = test_tiny.get_config()
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(0))
  root = tmp_path_factory.mktemp("attention")
  photo = root / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 110, 3), np.uint8)).save(photo)
  return convert.save_variables(jax.device_get(variables), root / "tiny"), str(photo)


def test_detector_attention_gives_each_detection_s_maps_over_the_image(checkpoint):
  path, photo = checkpoint
  config = test_tiny.get_config()
  config.evaluation.top_k = 3
  detector = conddetr_jax.load_detector(config, path, threshold=0.0)
  detections = detector.attention(photo)
  boxes, scores, labels = detector(photo)
  assert len(detections) == 3
  np.testing.assert_allclose([d.box for d in detections], boxes, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose([d.score for d in detections], scores, rtol=1e-5)
  assert [d.label for d in detections] == labels.tolist()
  for det in detections:
    assert det.layer == 1 and 0 <= det.query < config.model.num_queries
    assert 0 <= det.reference[0] <= 110 and 0 <= det.reference[1] <= 70
    for part in attention_maps.PARTS:
      # 70 x 110 is resized to 41 x 64 for the model: 6 x 8 valid cells of stride 8.
      assert det.weights[part].shape == det.logits[part].shape == (config.model.nheads, 6, 8)
      np.testing.assert_allclose(det.weights[part].sum(axis=(1, 2)), 1.0, rtol=1e-5)
      assert det.maps(part).shape == (config.model.nheads, 70, 110)
  first = detector.attention(photo, layer=0)[0]
  assert first.layer == 0
  assert not np.allclose(first.weights["spatial"], detections[0].weights["spatial"])


def test_predict_attention_writes_a_png_and_the_raw_maps_per_detection(checkpoint, tmp_path):
  path, photo = checkpoint
  out = tmp_path / "out"
  processes.run_python_ok(
    "predict.py",
    "--config=configs/test_tiny.py",
    "--config.evaluation.top_k=2",
    f"--checkpoint={path}",
    f"--out={out}",
    "--threshold=0.0",
    "--attention",
    photo,
    env=processes.cpu_env(),
  )
  [record] = json.loads((out / "detections.json").read_text())
  assert [os.path.basename(a["png"]) for a in record["attention"]] == [
    "photo_attention_0.png",
    "photo_attention_1.png",
  ]
  config = test_tiny.get_config()
  config.evaluation.top_k = 2
  expected = conddetr_jax.load_detector(config, path, threshold=0.0).attention(photo)
  for files, det in zip(record["attention"], expected):
    with Image.open(files["png"]) as png:
      assert png.format == "PNG" and png.width > 400
    with np.load(files["npz"]) as raw:
      assert int(raw["query"]) == det.query and int(raw["layer"]) == 1
      np.testing.assert_array_equal(raw["image_size"], [70, 110])
      np.testing.assert_allclose(raw["reference_xy"], det.reference, rtol=1e-6)
      for part in attention_maps.PARTS:
        np.testing.assert_allclose(raw[f"{part}_weights"], det.weights[part], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(raw[f"{part}_logits"], det.logits[part], rtol=1e-5, atol=1e-6)
