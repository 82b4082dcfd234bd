"""Tests of the PyTorch reference harness (tests/hf_reference.py) that parity tests rely on."""

import re

import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers import ConditionalDetrForObjectDetection

from tests import hf_reference

SMALL = dict(encoder_layers=2, decoder_layers=3, num_queries=20)
# A conditional decoder layer's Linear projections, named alike in the original and in HF.
DECODER_PROJECTIONS = (
  "sa_qcontent_proj",
  "sa_qpos_proj",
  "sa_kcontent_proj",
  "sa_kpos_proj",
  "sa_v_proj",
  "ca_qcontent_proj",
  "ca_kcontent_proj",
  "ca_kpos_proj",
  "ca_v_proj",
  "ca_qpos_sine_proj",
)


@pytest.fixture(scope="module")
def batch():
  return hf_reference.padded_batch()


@pytest.fixture(scope="module")
def r50():
  """The original's R50 sizes: 6 + 6 layers, 300 queries, 91 classes."""
  return hf_reference.build_reference()


@pytest.fixture(scope="module")
def dc5():
  return hf_reference.build_reference(dilation=True, num_classes=7, seed=1, **SMALL)


@pytest.fixture(scope="module", params=["r50", "dc5"])
def ref_and_outputs(request, batch):
  ref = request.getfixturevalue(request.param)
  images, pad_mask = batch
  return ref, hf_reference.run_reference(ref, images, pad_mask)


def test_output_names_and_shapes(ref_and_outputs, batch):
  ref, out = ref_and_outputs
  images, _ = batch
  b, height, width, _ = images.shape
  stride = 16 if ref.config.dilation else 32
  h, w = -(-height // stride), -(-width // stride)
  layers, queries = ref.config.decoder_layers, ref.config.num_queries
  classes = ref.config.num_labels
  expected = {
    "backbone_features": (b, h, w, 2048),
    "feature_mask": (b, h, w),
    "pos_embed": (b, h, w, 256),
    "input_proj": (b, h, w, 256),
    "memory": (b, h * w, 256),
    "decoder_hidden": (layers, b, queries, 256),
    "reference_points": (b, queries, 2),
    "pred_logits": (b, queries, classes),
    "pred_boxes": (b, queries, 4),
    "aux_logits": (layers - 1, b, queries, classes),
    "aux_boxes": (layers - 1, b, queries, 4),
  }
  assert {k: v.shape for k, v in out.items()} == expected
  assert out["feature_mask"].dtype == bool
  assert all(v.dtype == np.float32 for k, v in out.items() if k != "feature_mask")


def test_feature_mask_is_true_on_padding(ref_and_outputs, batch):
  ref, out = ref_and_outputs
  _, pad_mask = batch
  stride = 16 if ref.config.dilation else 32
  # Nearest downsampling: a feature cell is padding iff the pixel at stride * index is.
  np.testing.assert_array_equal(out["feature_mask"], pad_mask[:, ::stride, ::stride])
  assert not out["feature_mask"][0].any() and out["feature_mask"][1].any()


def test_dc5_features_are_at_stride_16(dc5, r50, batch):
  images, pad_mask = batch
  features = hf_reference.run_reference(dc5, images, pad_mask)["backbone_features"]
  assert features.shape[1:3] == (images.shape[1] // 16, images.shape[2] // 16)
  layer4 = r50.model.model.backbone.model.layer4
  assert layer4[0].conv2.stride == (2, 2)
  layer4 = dc5.model.model.backbone.model.layer4
  assert layer4[0].conv2.stride == (1, 1) and layer4[1].conv2.dilation == (2, 2)


def test_last_layer_equals_hf_own_predictions(ref_and_outputs, batch):
  ref, out = ref_and_outputs
  hf_out, _ = hf_reference.forward_with_captures(ref, *batch)
  np.testing.assert_allclose(out["pred_logits"], hf_out.logits.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], hf_out.pred_boxes.numpy(), atol=1e-6, rtol=0)


def _layer_norm(x, weight, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def test_every_layer_output_is_rebuilt_from_hf_hidden_states(ref_and_outputs, batch):
  """Recomputes the original's per-layer outputs in numpy from HF's decoder hidden states.

  HF returns L + 1 decoder hidden states: the zero input, the raw (un-normed) outputs of layers
  0..L-2, and the last layer's output after the final LayerNorm (== last_hidden_state).
  """
  ref, out = ref_and_outputs
  hf_out, _ = hf_reference.forward_with_captures(ref, *batch)
  states = [h.numpy() for h in hf_out.decoder_hidden_states]
  layers = ref.config.decoder_layers
  assert len(states) == layers + 1
  assert not states[0].any()
  np.testing.assert_array_equal(states[-1], hf_out.last_hidden_state.numpy())
  sd = hf_reference.hf_state_dict(ref)
  norm = lambda x: _layer_norm(
    x, sd["model.decoder.layernorm.weight"], sd["model.decoder.layernorm.bias"]
  )
  hidden = np.stack([norm(h) for h in states[1:-1]] + [states[-1]])
  np.testing.assert_allclose(out["decoder_hidden"], hidden, atol=1e-5, rtol=0)

  linear = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]
  logits = linear(hidden, "class_labels_classifier")
  x = hidden
  for i in range(3):
    x = linear(x, f"bbox_predictor.layers.{i}")
    x = np.maximum(x, 0) if i < 2 else x
  reference = np.clip(out["reference_points"], 1e-5, 1 - 1e-5)
  x[..., :2] += np.log(reference / (1 - reference))
  boxes = 1 / (1 + np.exp(-x))
  np.testing.assert_allclose(out["aux_logits"], logits[:-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pred_logits"], logits[-1], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["aux_boxes"], boxes[:-1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["pred_boxes"], boxes[-1], atol=1e-5, rtol=0)


def test_reference_points_are_the_sigmoid_of_the_reference_head(ref_and_outputs):
  ref, out = ref_and_outputs
  sd = hf_reference.hf_state_dict(ref)
  x = sd["model.query_position_embeddings.weight"]
  x = np.maximum(
    x @ sd["model.decoder.ref_point_head.layers.0.weight"].T
    + sd["model.decoder.ref_point_head.layers.0.bias"],
    0,
  )
  x = x @ sd["model.decoder.ref_point_head.layers.1.weight"].T
  x = x + sd["model.decoder.ref_point_head.layers.1.bias"]
  expected = np.broadcast_to(1 / (1 + np.exp(-x)), out["reference_points"].shape)
  np.testing.assert_allclose(out["reference_points"], expected, atol=1e-6, rtol=0)


# --- strength of the random weights ---------------------------------------------------------


def test_no_weight_is_left_at_a_constant_init(ref_and_outputs):
  ref, _ = ref_and_outputs
  constant = [k for k, v in hf_reference.hf_state_dict(ref).items() if v.size > 1 and v.std() == 0]
  assert not constant
  variances = [v for k, v in hf_reference.hf_state_dict(ref).items() if k.endswith("running_var")]
  assert variances and all((v > 0).all() for v in variances)


def test_queries_clearly_differ(ref_and_outputs):
  """With HF's plain init all queries agree to ~1e-3 (top scores tie to ~1e-7), so a parity
  test at ~1e-4 could not see a wrong query. Here they differ by >= 50x the parity tolerances
  (logits 1e-4, boxes 1e-5)."""
  _, out = ref_and_outputs
  for image in range(out["pred_logits"].shape[0]):
    assert out["pred_logits"][image].std(axis=0).mean() > 5e-3
    assert out["aux_logits"][:, image].std(axis=1).mean() > 5e-3
    box_std = out["pred_boxes"][image].std(axis=0)
    assert box_std[:2].min() > 0.1  # centres follow the spread reference points
    assert box_std[2:].min() > 5e-4  # sizes come from the decoder output alone
    assert out["decoder_hidden"][:, image].std(axis=1).mean(axis=-1).min() > 2e-3
  assert out["reference_points"].std(axis=1).min() > 0.1
  # Activations stay O(1): float32 parity at ~1e-4 means something.
  assert np.abs(out["memory"]).max() < 20 and np.abs(out["pred_logits"]).max() < 50


def test_memory_tokens_differ(ref_and_outputs):
  _, out = ref_and_outputs
  assert out["memory"].std(axis=1).mean() > 0.1


def test_a_wrong_spatial_query_is_visible(dc5, batch):
  """Swapping the x and y halves of the sine embedding (a plausible port bug) moves outputs."""
  images, pad_mask = batch
  out = hf_reference.run_reference(dc5, images, pad_mask)
  swapped = hf_reference.build_reference(dilation=True, num_classes=7, seed=1, **SMALL)
  with torch.no_grad():
    for layer in swapped.model.model.decoder.layers:
      weight = layer.encoder_attn.q_pos_sine_proj.weight
      weight.copy_(torch.cat([weight[:, 128:], weight[:, :128]], dim=1))
  wrong = hf_reference.run_reference(swapped, images, pad_mask)
  assert np.abs(wrong["pred_logits"] - out["pred_logits"]).max() > 0.05
  assert np.abs(wrong["pred_boxes"] - out["pred_boxes"]).max() > 0.01


# --- key layouts ------------------------------------------------------------------------------


def _original_backbone(dilation):
  """The original's backbone body: torchvision ResNet-50, frozen BN, layers up to layer4."""
  resnet = torchvision.models.resnet50(
    weights=None,
    replace_stride_with_dilation=[False, False, dilation],
    norm_layer=FrozenBatchNorm2d,
  )
  return IntermediateLayerGetter(resnet, return_layers={"layer4": "0"}).eval()


def _original_transformer_shapes(config):
  """Key -> shape of the original's non-backbone weights, from models/transformer.py,
  models/attention.py and models/conditional_detr.py (MLP = `layers.i` Linears)."""
  d, ffn, c = config.d_model, config.encoder_ffn_dim, config.num_labels
  shapes = {
    "input_proj.weight": (d, 2048, 1, 1),
    "input_proj.bias": (d,),
    "query_embed.weight": (config.num_queries, d),
    "class_embed.weight": (c, d),
    "class_embed.bias": (c,),
    "transformer.decoder.norm.weight": (d,),
    "transformer.decoder.norm.bias": (d,),
  }

  def linear(name, n_in, n_out):
    shapes[name + ".weight"], shapes[name + ".bias"] = (n_out, n_in), (n_out,)

  for i, (n_in, n_out) in enumerate([(d, d), (d, d), (d, 4)]):
    linear(f"bbox_embed.layers.{i}", n_in, n_out)
  for i, (n_in, n_out) in enumerate([(d, d), (d, d)]):
    linear(f"transformer.decoder.query_scale.layers.{i}", n_in, n_out)
  for i, (n_in, n_out) in enumerate([(d, d), (d, 2)]):
    linear(f"transformer.decoder.ref_point_head.layers.{i}", n_in, n_out)
  for i in range(config.encoder_layers):
    p = f"transformer.encoder.layers.{i}."
    shapes[p + "self_attn.in_proj_weight"], shapes[p + "self_attn.in_proj_bias"] = (
      (3 * d, d),
      (3 * d,),
    )
    linear(p + "self_attn.out_proj", d, d)
    linear(p + "linear1", d, ffn)
    linear(p + "linear2", ffn, d)
    for norm in ("norm1", "norm2"):
      shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (d,), (d,)
  for i in range(config.decoder_layers):
    p = f"transformer.decoder.layers.{i}."
    projections = [*DECODER_PROJECTIONS, "self_attn.out_proj", "cross_attn.out_proj"]
    if i == 0:  # Set to None in the later layers, so absent from their state dicts.
      projections.append("ca_qpos_proj")
    for name in projections:
      linear(p + name, d, d)
    linear(p + "linear1", d, ffn)
    linear(p + "linear2", ffn, d)
    for norm in ("norm1", "norm2", "norm3"):
      shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (d,), (d,)
  return shapes


def _count_by_prefix(keys):
  prefixes = (
    "backbone.0.body.",
    "transformer.encoder.",
    "transformer.decoder.layers.",
    "transformer.decoder.",
    "input_proj.",
    "query_embed.",
    "class_embed.",
    "bbox_embed.",
  )
  counts = dict.fromkeys(prefixes, 0)
  for key in keys:
    counts[next(p for p in prefixes if key.startswith(p))] += 1
  return counts


@pytest.mark.parametrize("name", ["r50", "dc5"])
def test_original_state_dict_has_the_original_keys_and_shapes(request, name):
  ref = request.getfixturevalue(name)
  original = hf_reference.original_state_dict(ref)
  expected = {
    "backbone.0.body." + k: tuple(v.shape)
    for k, v in _original_backbone(ref.config.dilation).state_dict().items()
  }
  expected.update(_original_transformer_shapes(ref.config))
  assert {k: v.shape for k, v in original.items()} == expected
  assert not any("num_batches_tracked" in k for k in original)
  enc, dec = ref.config.encoder_layers, ref.config.decoder_layers
  assert _count_by_prefix(original) == {
    "backbone.0.body.": 265,
    "transformer.encoder.": 12 * enc,
    "transformer.decoder.layers.": 34 * dec + 2,
    "transformer.decoder.": 10,
    "input_proj.": 2,
    "query_embed.": 1,
    "class_embed.": 2,
    "bbox_embed.": 6,
  }


def test_full_size_layouts_have_the_known_key_counts(r50):
  assert len(hf_reference.original_state_dict(r50)) == 564
  # HF splits each encoder in_proj (weight, bias) into q/k/v: 6 layers x 4 more keys.
  assert len(hf_reference.hf_state_dict(r50)) == 588
  assert len(hf_reference.hf_state_dict_on_disk(r50)) == 588


def _conversion_script(original, config):
  """HF's convert_conditional_detr_original_pytorch_checkpoint_to_pytorch.py restated:
  the original's names -> transformers 4.x names (rename_keys, rename_backbone_keys,
  read_in_q_k_v, then the "model." prefix of the base model)."""
  pairs = [
    ("input_proj", "input_projection"),
    ("query_embed", "query_position_embeddings"),
    ("transformer.decoder.norm", "decoder.layernorm"),
    ("class_embed", "class_labels_classifier"),
    ("bbox_embed", "bbox_predictor"),
    ("transformer.decoder.ref_point_head", "decoder.ref_point_head"),
    ("transformer.decoder.query_scale", "decoder.query_scale"),
    ("transformer.decoder.layers.0.ca_qpos_proj", "decoder.layers.0.ca_qpos_proj"),
  ]
  # Each layer's renames: those of both stacks, then the encoder's and the decoder's own.
  both = [
    ("self_attn.out_proj", "self_attn.out_proj"),
    ("linear1", "fc1"),
    ("linear2", "fc2"),
    ("norm1", "self_attn_layer_norm"),
  ]
  encoder = [*both, ("norm2", "final_layer_norm")]
  decoder = [
    *both,
    ("cross_attn.out_proj", "encoder_attn.out_proj"),
    ("norm2", "encoder_attn_layer_norm"),
    ("norm3", "final_layer_norm"),
    *((name, name) for name in DECODER_PROJECTIONS),
  ]
  for stack, num_layers, renames in (
    ("encoder", config.encoder_layers, encoder),
    ("decoder", config.decoder_layers, decoder),
  ):
    for i in range(num_layers):
      src, dst = f"transformer.{stack}.layers.{i}.", f"{stack}.layers.{i}."
      pairs += [(src + a, dst + b) for a, b in renames]
  d = config.d_model
  converted = {}
  for key, value in original.items():
    match = re.match(r"transformer\.encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", key)
    if match:
      layer, kind = match.groups()
      for j, part in enumerate("qkv"):
        converted[f"encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = value[
          j * d : (j + 1) * d
        ]
    elif key.startswith("backbone.0.body."):
      converted[key.replace("backbone.0.body", "backbone.conv_encoder.model")] = value
    else:
      [new_key] = [dst + key[len(src) :] for src, dst in pairs if key.startswith(src + ".")]
      converted[new_key] = value
  return {
    (k if k.startswith(("class_labels_classifier", "bbox_predictor")) else "model." + k): v
    for k, v in converted.items()
  }


def _assert_same_arrays(actual, expected):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_on_disk_layout_is_what_save_pretrained_writes(dc5, tmp_path):
  dc5.model.save_pretrained(tmp_path)
  written = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  _assert_same_arrays(hf_reference.hf_state_dict_on_disk(dc5), written)


@pytest.mark.parametrize("name", ["r50", "dc5"])
def test_original_names_round_trip_through_hf_conversion(request, name, tmp_path):
  ref = request.getfixturevalue(name)
  hf4 = _conversion_script(hf_reference.original_state_dict(ref), ref.config)
  _assert_same_arrays(hf4, hf_reference.hf_state_dict_on_disk(ref))
  if name == "dc5":  # transformers' own loader maps 4.x -> 5.x names (small model: fast).
    ref.config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in hf4.items()}, str(tmp_path / "model.safetensors")
    )
    loaded, info = ConditionalDetrForObjectDetection.from_pretrained(
      tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    _assert_same_arrays(
      {k: v.numpy() for k, v in loaded.state_dict().items()}, hf_reference.hf_state_dict(ref)
    )


@pytest.mark.parametrize("name", ["r50", "dc5"])
def test_original_backbone_names_drive_torchvision_resnet_to_the_same_features(
  request, name, batch
):
  """Loads the original-layout backbone weights into the original's own construction
  (torchvision ResNet with replace_stride_with_dilation) and compares features."""
  ref = request.getfixturevalue(name)
  images, pad_mask = batch
  body = _original_backbone(ref.config.dilation)
  prefix = "backbone.0.body."
  weights = {
    k[len(prefix) :]: torch.from_numpy(v)
    for k, v in hf_reference.original_state_dict(ref).items()
    if k.startswith(prefix)
  }
  body.load_state_dict(weights, strict=True)
  with torch.no_grad():
    features = body(torch.from_numpy(images).permute(0, 3, 1, 2))["0"]
  expected = hf_reference.run_reference(ref, images, pad_mask)["backbone_features"]
  actual = features.permute(0, 2, 3, 1).numpy()
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, atol=1e-5 * scale, rtol=0)
