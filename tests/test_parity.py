"""Numerical parity with an independent implementation: HF transformers' ConditionalDetr (PyTorch).

The reference (tests/hf_reference.py) has strong random weights, so a wrong spatial query or a
swapped head cannot hide behind collapsed, identical queries. Its weights are exported in the
original repository's key layout and in HF's 4.x (disk) and 5.x (memory) layouts; each goes
through ``convert.from_torch`` into the Flax model, whose outputs must match the reference's.

Parity is checked in stages, because two correct float32 ResNet-50s (XLA's and oneDNN's
convolutions) already differ by ~1e-5 of the feature scale, and the transformer, with attention
sharp enough to keep 300 queries apart, amplifies that tenfold:
- the backbone alone, to 3e-5 of its output's scale;
- everything after it (mask, positions, projection, encoder, decoder, heads) fed with the
  reference's own backbone features, at the issue's tolerances: logits 1e-4 and boxes 1e-5,
  final and auxiliary layers;
- the whole model end to end, within the backbone's rounding as amplified downstream.
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conddetr_jax import models
from conddetr_jax.checkpoints import convert
from conddetr_jax.criterion import losses
from conddetr_jax.models.backbone import ResNet
from configs import default
from tests import hf_reference

LOGITS_ATOL = 1e-4
BOXES_ATOL = 1e-5
BACKBONE_RTOL = 3e-5  # of max |features|; measured 1.0e-5 (R50) on this CPU
# End to end, the backbone's rounding reaches the outputs amplified (measured: logits 4e-3,
# boxes 2e-4 on R50; see the module docstring).
END_TO_END_LOGITS_ATOL = 2e-2
END_TO_END_BOXES_ATOL = 2e-3
# Of each gradient tensor's largest magnitude: float32 rounding, amplified by the reference's sharp
# attention, gave a median of 5e-5 and at most 3.4e-3 over runs (threaded reductions vary).
GRAD_RTOL = 1e-2
GRAD_NOISE = 1e-6  # of the largest gradient magnitude of the model

# Batches of two images of different sizes; the first leaves padded cells at strides 32 and 16,
# the second has a padded size that is not a multiple of 32.
SIZES = {"multiple_of_32": ((128, 160), (96, 112)), "odd_size": ((97, 131), (70, 100))}


def make_config(dilation=False, dtype="float32"):
  config = default.get_config()
  config.model.dilation = dilation
  config.model.dropout = 0.0
  config.model.mask_padding = "never"  # the original's padded forward, which the reference runs
  config.model.dtype = dtype
  return config


@functools.lru_cache(maxsize=None)
def reference(dilation):
  return hf_reference.build_reference("resnet50", dilation=dilation, seed=3)


@functools.lru_cache(maxsize=None)
def reference_outputs(dilation, case):
  images, pad_mask = hf_reference.padded_batch(SIZES[case])
  return images, pad_mask, hf_reference.run_reference(reference(dilation), images, pad_mask)


@functools.lru_cache(maxsize=None)
def r50_init():
  """make_config()'s initial variables, seed 1 (not the reference's weights)."""
  return convert.init_variables(make_config(), seed=1)


@functools.lru_cache(maxsize=None)
def compiled_forward(dilation, dtype, inject_features):
  """jit(apply) returning outputs and intermediates; optionally with the backbone replaced by
  given features (Flax method interception), to test everything downstream of it."""
  model = models.build_model(make_config(dilation, dtype))

  def forward(variables, images, pad_mask, features):
    def use_given_features(next_fun, args, kwargs, context):
      if isinstance(context.module, ResNet) and context.method_name == "__call__":
        return features
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(
      use_given_features if inject_features else lambda f, a, k, c: f(*a, **k)
    ):
      return model.apply(variables, images, pad_mask, mutable=["intermediates"])

  return jax.jit(forward)


def run_flax(variables, images, pad_mask, *, dilation=False, dtype="float32", features=None):
  forward = compiled_forward(dilation, dtype, features is not None)
  out, state = forward(
    variables,
    jnp.asarray(images),
    jnp.asarray(pad_mask),
    None if features is None else jnp.asarray(features),
  )
  ours = {k: np.asarray(v[0], np.float32) for k, v in state["intermediates"].items()}
  ours["pred_logits"] = np.asarray(out["pred_logits"])
  ours["pred_boxes"] = np.asarray(out["pred_boxes"])
  ours["aux_logits"] = np.stack([np.asarray(a["pred_logits"]) for a in out["aux_outputs"]])
  ours["aux_boxes"] = np.stack([np.asarray(a["pred_boxes"]) for a in out["aux_outputs"]])
  return ours


def assert_close(ours, ref, name, atol):
  np.testing.assert_allclose(ours, ref, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50_dc5"])
def test_backbone_matches_reference_to_float32_rounding(dilation):
  images, _, ref = reference_outputs(dilation, "odd_size")
  variables = convert.from_torch(
    hf_reference.original_state_dict(reference(dilation)), make_config(dilation)
  )
  backbone = ResNet("resnet50", dilation)
  features = jax.jit(backbone.apply)(
    {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
    },
    images,
  )
  stride = 16 if dilation else 32
  assert features.shape == (2, -(-97 // stride), -(-131 // stride), 2048)
  scale = np.abs(ref["backbone_features"]).max()
  assert_close(
    np.asarray(features), ref["backbone_features"], "backbone_features", BACKBONE_RTOL * scale
  )


@pytest.mark.parametrize(
  "dilation,case,layout",
  [
    (False, "multiple_of_32", "original"),
    (False, "odd_size", "original"),
    (True, "odd_size", "original"),
    (False, "multiple_of_32", "hf5"),
    (False, "multiple_of_32", "hf4"),
  ],
)
def test_detector_on_reference_backbone_features_matches_reference(dilation, case, layout):
  images, pad_mask, ref = reference_outputs(dilation, case)
  export = {
    "original": hf_reference.original_state_dict,
    "hf5": hf_reference.hf_state_dict,
    "hf4": hf_reference.hf_state_dict_on_disk,
  }[layout]
  variables = convert.from_torch(export(reference(dilation)), make_config(dilation))
  ours = run_flax(variables, images, pad_mask, dilation=dilation, features=ref["backbone_features"])
  np.testing.assert_array_equal(ours["feature_mask"].astype(bool), ref["feature_mask"])
  assert ref["feature_mask"].any(), "the batch must have padded feature cells"
  assert_close(ours["pos_embed"], ref["pos_embed"], "pos_embed", 1e-5)
  assert_close(ours["projected_features"], ref["input_proj"], "input_proj", 1e-4)
  assert_close(ours["memory"], ref["memory"], "memory", 1e-4)
  assert_close(ours["decoder_hidden"], ref["decoder_hidden"], "decoder_hidden", 1e-4)
  assert_close(ours["reference_points"], ref["reference_points"], "reference_points", 1e-6)
  for name, atol in [
    ("pred_logits", LOGITS_ATOL),
    ("aux_logits", LOGITS_ATOL),
    ("pred_boxes", BOXES_ATOL),
    ("aux_boxes", BOXES_ATOL),
  ]:
    assert_close(ours[name], ref[name], name, atol)


def test_whole_model_matches_reference_end_to_end():
  images, pad_mask, ref = reference_outputs(False, "odd_size")
  variables = convert.from_torch(hf_reference.original_state_dict(reference(False)), make_config())
  ours = run_flax(variables, images, pad_mask)
  for name, atol in [
    ("pred_logits", END_TO_END_LOGITS_ATOL),
    ("aux_logits", END_TO_END_LOGITS_ATOL),
    ("pred_boxes", END_TO_END_BOXES_ATOL),
    ("aux_boxes", END_TO_END_BOXES_ATOL),
  ]:
    assert_close(ours[name], ref[name], name, atol)


def test_checkpoint_files_load_as_the_original_and_hf_write_them(tmp_path):
  """The original's {'model': ..., 'args': Namespace} .pth, HF's .safetensors and .bin."""
  from safetensors.numpy import save_file

  ref = reference(False)
  original = hf_reference.original_state_dict(ref)
  torch.save(
    {
      "model": {k: torch.from_numpy(v) for k, v in original.items()},
      "args": argparse.Namespace(lr=1e-4),
      "epoch": 49,
    },
    tmp_path / "conddetr_r50.pth",
  )
  save_file(hf_reference.hf_state_dict_on_disk(ref), str(tmp_path / "model.safetensors"))
  torch.save(
    {k: torch.from_numpy(v) for k, v in hf_reference.hf_state_dict(ref).items()},
    tmp_path / "pytorch_model.bin",
  )
  from_dict = convert.from_torch(original, make_config())
  for name in ("conddetr_r50.pth", "model.safetensors", "pytorch_model.bin"):
    loaded = convert.from_torch(tmp_path / name, make_config())
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, from_dict)


def test_torchvision_imagenet_backbone_initialises_the_backbone_only():
  original = hf_reference.original_state_dict(reference(False))
  prefix = "backbone.0.body."
  torchvision_sd = {k[len(prefix) :]: v for k, v in original.items() if k.startswith(prefix)}
  torchvision_sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  torchvision_sd["fc.bias"] = np.zeros((1000,), np.float32)
  config = make_config()
  init = r50_init()
  loaded = convert.from_torch(torchvision_sd, config, variables=init)
  full = convert.from_torch(original, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["batch_stats"], full["batch_stats"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, loaded["params"]["backbone"], full["params"]["backbone"]
  )
  for name in ("encoder", "decoder", "class_embed", "query_embed"):
    jax.tree_util.tree_map(
      np.testing.assert_array_equal, loaded["params"][name], init["params"][name]
    )


def test_class_count_mismatch_is_an_error_unless_the_class_head_is_skipped(caplog):
  original = hf_reference.original_state_dict(reference(False))
  config = make_config()
  config.model.num_classes = 3
  with pytest.raises(convert.CheckpointMismatchError, match="skip_class_head"):
    convert.from_torch(original, config)
  config.init.skip_class_head = True
  # The 3-class model's fresh variables: R50's with a 3-class head (R50's init compiles in a
  # minute).
  rng = np.random.default_rng(0)
  head = {
    "kernel": rng.normal(size=(256, 3)).astype(np.float32),
    "bias": rng.normal(size=3).astype(np.float32),
  }
  init = {**r50_init(), "params": {**r50_init()["params"], "class_embed": head}}
  variables = convert.from_torch(original, config, variables=init)
  assert variables["params"]["class_embed"]["kernel"].shape == (256, 3)
  np.testing.assert_array_equal(
    variables["params"]["class_embed"]["bias"], init["params"]["class_embed"]["bias"]
  )
  assert "class_embed.weight" in caplog.text


def test_mismatched_checkpoint_lists_missing_unexpected_and_misshapen_keys():
  original = dict(hf_reference.original_state_dict(reference(False)))
  del original["transformer.decoder.norm.weight"]
  original["transformer.decoder.extra.weight"] = np.zeros(3, np.float32)
  original["query_embed.weight"] = np.zeros((100, 256), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.from_torch(original, make_config())
  message = str(error.value)
  assert "missing keys (1): transformer.decoder.norm.weight" in message
  assert "unexpected keys (1): transformer.decoder.extra.weight" in message
  assert "query_embed.weight: checkpoint (100, 256)" in message


def test_bfloat16_compute_is_finite_and_stays_near_the_float32_reference():
  """bf16 has an 8-bit mantissa; on these deliberately sharp random weights its rounding is
  amplified like float32's, only 1e4 times larger. Bounds are ~1.5x the measured errors:
  backbone 9% (relative L2), logits 3% and boxes 0.054 (absolute) given the same features."""
  images, pad_mask, ref = reference_outputs(False, "odd_size")
  variables = convert.from_torch(hf_reference.original_state_dict(reference(False)), make_config())
  relative = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  end_to_end = run_flax(variables, images, pad_mask, dtype="bfloat16")
  given_features = run_flax(
    variables, images, pad_mask, dtype="bfloat16", features=ref["backbone_features"]
  )
  for ours in (end_to_end, given_features):
    for name in ("pred_logits", "pred_boxes", "aux_logits", "aux_boxes"):
      assert np.all(np.isfinite(ours[name])), name
  assert relative(end_to_end["backbone_features"], ref["backbone_features"]) < 0.15
  assert relative(given_features["pred_logits"], ref["pred_logits"]) < 0.05
  assert np.abs(given_features["pred_boxes"] - ref["pred_boxes"]).max() < 0.08


def _grad_tree_from_torch(ref: hf_reference.Reference, config) -> dict:
  """The reference's parameter gradients in our parameter tree: its state dict with each trained
  weight replaced by its ``.grad`` goes through the checkpoint converter (whose renaming, splits
  and transposes are permutations, so gradients map exactly as weights do)."""
  grads = {name: p.grad for name, p in ref.model.named_parameters() if p.grad is not None}
  state = {
    k: (grads[k] if k in grads else v).detach().numpy().copy()
    for k, v in ref.model.state_dict().items()
  }
  return convert.from_torch(state, config)["params"]


def test_loss_gradients_match_reference_autograd():
  """Training parity: the gradient of the set loss (Hungarian matching, focal, L1 and GIoU terms)
  with respect to every weight after the backbone equals PyTorch autograd through HF's model and
  HF's loss. Both run on the reference's backbone features; the reference has no auxiliary loss,
  so neither side uses one."""
  ref = reference(False)
  images, pad_mask, ref_out = reference_outputs(False, "multiple_of_32")
  rng = np.random.default_rng(5)
  valid = np.array([[True, True, True, False], [True, True, False, False]])
  boxes = np.concatenate(
    [rng.uniform(0.25, 0.75, (2, 4, 2)), rng.uniform(0.1, 0.4, (2, 4, 2))], -1
  ).astype(np.float32)
  labels = rng.integers(1, 91, (2, 4)).astype(np.int32)

  ref.model.zero_grad()
  targets = [
    {
      "class_labels": torch.from_numpy(labels[i][valid[i]]).long(),
      "boxes": torch.from_numpy(boxes[i][valid[i]]),
    }
    for i in range(2)
  ]
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2)
  out = ref.model(
    pixel_values=pixel_values, pixel_mask=torch.from_numpy(~pad_mask).long(), labels=targets
  )
  # HF's own total weighs loss_ce by 1; the original weighs it by cls_loss_coef = 2, as we do.
  terms = out.loss_dict
  reference_loss = 2.0 * terms["loss_ce"] + 5.0 * terms["loss_bbox"] + 2.0 * terms["loss_giou"]
  reference_loss.backward()

  config = make_config()
  config.model.aux_loss = False
  theirs = _grad_tree_from_torch(ref, config)
  ref.model.zero_grad()
  model = models.build_model(config)
  variables = convert.from_torch(hf_reference.hf_state_dict(ref), config)
  features = jnp.asarray(ref_out["backbone_features"])
  batch = {
    "boxes": jnp.asarray(boxes),
    "labels": jnp.asarray(labels),
    "box_valid": jnp.asarray(valid),
  }

  def loss(params):
    def use_reference_features(next_fun, args, kwargs, context):
      if isinstance(context.module, ResNet) and context.method_name == "__call__":
        return features
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(use_reference_features):
      outputs = model.apply(
        {**variables, "params": params}, jnp.asarray(images), jnp.asarray(pad_mask)
      )
    return losses.set_criterion(outputs, batch, config)["loss"]

  value, ours = jax.jit(jax.value_and_grad(loss))(variables["params"])
  np.testing.assert_allclose(float(value), float(reference_loss.detach()), rtol=1e-5)
  pairs = [
    (jax.tree_util.keystr(path), np.asarray(g), np.asarray(g_ref))
    for (path, g), (_, g_ref) in zip(
      jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves_with_path(theirs)
    )
    if "backbone" not in jax.tree_util.keystr(path)
  ]
  assert len(pairs) > 100
  # Gradients that are zero in exact arithmetic (a key bias shifts every logit of a query alike,
  # which softmax ignores) are rounding noise on both sides: below GRAD_NOISE of the largest.
  noise = GRAD_NOISE * max(float(np.abs(g_ref).max()) for _, _, g_ref in pairs)
  for name, g, g_ref in pairs:
    np.testing.assert_allclose(
      g, g_ref, atol=GRAD_RTOL * float(np.abs(g_ref).max()) + noise, rtol=0, err_msg=name
    )
