"""The Flax model's structure: frozen parts, compilation, mask resizing, DC5, three-stage backbones,
config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision  # after tests/conftest.py declared the ops a CUDA torchvision wheel cannot load

from conddetr_jax import models
from conddetr_jax.checkpoints import convert
from conddetr_jax.models.backbone import ResNet
from conddetr_jax.models.position import downsample_mask
from configs import default, test_tiny


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
  """configs/test_tiny.py's model with all four backbone stages, 8 queries, 5 classes and no
  dropout, then ``model_overrides``."""
  config = test_tiny.get_config()
  config.model.update(backbone_num_stages=4, num_queries=8, num_classes=5, dropout=0.0)
  config.model.update(model_overrides)
  return config


def _inputs(batch=2, h=64, w=96):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, h, w, 3)), jnp.float32)
  pad_mask = np.zeros((batch, h, w), bool)
  pad_mask[-1, h - 16 :, :] = True
  pad_mask[-1, :, w - 32 :] = True
  return images, jnp.asarray(pad_mask)


def _variables_and_gradients(config):
  """The model's initial variables and the gradient of a loss touching every output."""
  model = models.build_model(config)
  images, pad_mask = _inputs()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, pad_mask)

  def loss(params):
    out = model.apply({**variables, "params": params}, images, pad_mask)
    return jnp.sum(out["pred_logits"] ** 2) + jnp.sum(out["pred_boxes"])

  return variables, jax.jit(jax.grad(loss))(variables["params"])


def test_stem_and_layer1_get_exactly_zero_gradient_and_the_rest_does_not():
  variables, grads = _variables_and_gradients(tiny_config())
  labels = models.param_labels(variables["params"])
  flat_grads = jax.tree_util.tree_leaves_with_path(grads)
  flat_labels = jax.tree_util.tree_leaves(labels)
  frozen = [g for (path, g), label in zip(flat_grads, flat_labels) if label == "frozen"]
  trained = [g for (path, g), label in zip(flat_grads, flat_labels) if label == "backbone"]
  assert len(frozen) == 1 + 2 * 2  # stem conv1 + two BasicBlocks of two convs
  assert all(np.all(np.asarray(g) == 0) for g in frozen)
  assert all(np.any(np.asarray(g) != 0) for g in trained)
  # Frozen BatchNorm tensors are not parameters at all.
  assert "batch_stats" in variables and not any(
    "bn" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
  )


def test_group_norm_backbone_trains_everything_and_starts_each_block_as_the_identity():
  # The from-scratch setting (the demo): GroupNorm (a scale and bias per norm layer, no
  # statistics) and nothing frozen: every backbone tensor, stem included, gets a gradient.
  config = tiny_config(backbone_norm="group_norm", freeze_stem_and_layer1=False)
  variables, grads = _variables_and_gradients(config)
  assert "batch_stats" not in variables
  labels = models.param_labels(variables["params"], freeze_stem_and_layer1=False)
  assert "frozen" not in jax.tree_util.tree_leaves(labels)
  backbone = variables["params"]["backbone"]
  convs = 1 + 2 * 2 + 3 * (2 * 2 + 1)  # stem, layer1, layer2-4 (with their 1x1 shortcuts)
  assert (
    len(jax.tree_util.tree_leaves(grads["backbone"])) == convs * 3
  )  # conv kernel, norm scale, norm bias
  # While the norm ending a residual branch has a zero scale (at init), the layers before it in
  # the branch get no gradient; the stem, the shortcuts and that norm itself do.
  for path, g in jax.tree_util.tree_leaves_with_path(grads["backbone"]):
    keys = [k.key for k in path]
    inside_branch = keys[0].startswith("layer") and keys[1] in ("conv1", "bn1", "conv2")
    assert np.any(np.asarray(g) != 0) != inside_branch, keys
  for name, block in backbone.items():
    if name.startswith("layer"):
      np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
      np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(backbone["bn1"]["scale"], 1.0)


@pytest.mark.parametrize("norm", ["group_norm_ws", "group_norm"])
def test_weight_standardised_convs_ignore_each_kernels_scale_and_offset(norm):
  # Weight Standardization: each output channel's kernel is standardised before the conv, so a
  # positive scale and an offset per output channel leave the features as they are; with plain
  # GroupNorm (per group of channels, not per channel) they do not.
  backbone = ResNet("resnet18", norm=norm, freeze_stem_and_layer1=False, num_stages=2)
  images, _ = _inputs()
  variables = jax.jit(backbone.init)(jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(1)

  def perturb(path, leaf):
    if path[-1].key != "kernel":
      return leaf
    out_channels = leaf.shape[-1]
    return leaf * rng.uniform(0.5, 2.0, out_channels) + rng.normal(0, 0.1, out_channels)

  perturbed = jax.tree_util.tree_map_with_path(perturb, variables)
  # A block's branch starts switched off (its last norm's scale is 0): switch them on to see the
  # convs.
  on = lambda tree: jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      jnp.ones_like(leaf) if path[-2].key == "bn2" and path[-1].key == "scale" else leaf
    ),
    tree,
  )
  before = backbone.apply(on(variables), images)
  after = backbone.apply(on(perturbed), images)
  if norm == "group_norm_ws":
    np.testing.assert_allclose(after, before, atol=2e-4, rtol=1e-3)
  else:
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0.1


def test_weight_standardised_backbone_has_the_group_norm_params():
  images, _ = _inputs()
  shapes = {
    norm: jax.tree.map(
      jnp.shape,
      jax.eval_shape(
        ResNet("resnet18", norm=norm, num_stages=3).init, jax.random.PRNGKey(0), images
      ),
    )
    for norm in ("group_norm", "group_norm_ws")
  }
  assert shapes["group_norm"] == shapes["group_norm_ws"]


def test_model_compiles_once_per_input_shape():
  model = models.build_model(tiny_config())
  images, pad_mask = _inputs()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, pad_mask)
  traces = []

  @jax.jit
  def forward(variables, images, pad_mask):
    traces.append(images.shape)
    return model.apply(variables, images, pad_mask)["pred_boxes"]

  for _ in range(3):
    forward(variables, images, pad_mask)
  other_images, other_mask = _inputs(h=96, w=64)
  for _ in range(2):
    forward(variables, other_images, other_mask)
  assert traces == [(2, 64, 96, 3), (2, 96, 64, 3)]


@pytest.mark.parametrize(
  "in_size,out_size",
  [((800, 1216), (25, 38)), ((810, 1201), (26, 38)), ((97, 131), (4, 5)), ((65, 64), (3, 2))],
)
def test_mask_downsampling_matches_torch_nearest_interpolation(in_size, out_size):
  rng = np.random.default_rng(1)
  mask = rng.random((2, *in_size)) < 0.5
  expected = (
    torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=out_size)[0]
    .bool()
    .numpy()
  )
  np.testing.assert_array_equal(np.asarray(downsample_mask(jnp.asarray(mask), out_size)), expected)


@pytest.mark.parametrize(
  "backbone,dilation,stages,stride,channels",
  [
    ("resnet18", False, 4, 32, 512),
    ("resnet34", False, 4, 32, 512),
    ("resnet18", True, 4, 16, 512),
    ("resnet34", True, 4, 16, 512),
    ("resnet50", False, 4, 32, 2048),
    ("resnet50", True, 4, 16, 2048),
    ("resnet101", True, 4, 16, 2048),
    ("resnet18", False, 3, 16, 256),
    ("resnet18", True, 3, 8, 256),
    ("resnet50", False, 3, 16, 1024),
    ("resnet18", False, 2, 8, 128),
    ("resnet50", False, 2, 8, 512),
  ],
)
def test_backbone_output_stride_and_channels(backbone, dilation, stages, stride, channels):
  model = models.build_model(
    tiny_config(backbone=backbone, dilation=dilation, backbone_num_stages=stages)
  )
  images, pad_mask = _inputs(batch=1, h=97, w=130)  # not multiples of the stride: ceil division
  shapes = jax.eval_shape(
    lambda: model.init_with_output(
      jax.random.PRNGKey(0), images, pad_mask, mutable=["params", "batch_stats", "intermediates"]
    )
  )
  features = shapes[1]["intermediates"]["backbone_features"][0]
  assert features.shape == (1, -(-97 // stride), -(-130 // stride), channels)


def test_r50_has_the_originals_parameter_count():
  # 43.4M trainable tensors + frozen stem/layer1 (the original's table rounds to 44M with BN).
  model = models.build_model(default.get_config())
  images, pad_mask = _inputs(batch=1)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, pad_mask))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
  bn = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["batch_stats"])) // 2
  assert 43.0e6 < count + bn < 44.0e6


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(backbone="resnet152"), "config.model.backbone"),
    (dict(dtype="float16"), "config.model.dtype"),
    (dict(backbone_norm="batch_norm"), "config.model.backbone_norm"),
    (dict(decoder="deformable"), "config.model.decoder"),
    (dict(backbone_num_stages=1), "config.model.backbone_num_stages"),
    (dict(hidden_dim=30, nheads=4), "config.model.hidden_dim"),
    (dict(attention="flash"), "config.model.attention"),
    (dict(remat="full"), "config.model.remat"),
    (dict(attention_block_size=0), "config.model.attention_block_size"),
  ],
)
def test_bad_model_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    models.build_model(tiny_config(**overrides))


def _torch_resnet18_dc5(variables, images: np.ndarray) -> np.ndarray:
  """ResNet-18 with DC5 written independently in torch, as timm builds it (torchvision refuses):
  layer4 keeps stride 1, its first conv dilation 1 and every later 3x3 conv dilation 2."""
  params, stats = variables["params"], variables["batch_stats"]

  def conv(x, p, stride=1, dilation=1):
    w = torch.from_numpy(np.asarray(p["kernel"])).permute(3, 2, 0, 1)
    return F.conv2d(x, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)

  def frozen_bn(x, s):
    s = {k: torch.from_numpy(np.asarray(v))[None, :, None, None] for k, v in s.items()}
    return (x - s["mean"]) / torch.sqrt(s["var"] + 1e-5) * s["scale"] + s["bias"]

  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  x = F.max_pool2d(F.relu(frozen_bn(conv(x, params["conv1"], 2), stats["bn1"])), 3, 2, 1)
  for stage in range(1, 5):
    for i in range(2):
      p, s = params[f"layer{stage}_{i}"], stats[f"layer{stage}_{i}"]
      stride = 2 if stage in (2, 3) and i == 0 else 1
      y = F.relu(frozen_bn(conv(x, p["conv1"], stride, 2 if stage == 4 and i else 1), s["bn1"]))
      y = frozen_bn(conv(y, p["conv2"], 1, 2 if stage == 4 else 1), s["bn2"])
      if "downsample_conv" in p:
        x = frozen_bn(conv(x, p["downsample_conv"], stride), s["downsample_bn"])
      x = F.relu(y + x)
  return x.permute(0, 2, 3, 1).numpy()


def test_dc5_resnet18_matches_a_torch_dilated_resnet18():
  model = ResNet("resnet18", dilation=True)
  images = np.random.default_rng(2).normal(size=(1, 80, 96, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  # Random frozen statistics, so every BatchNorm is visible in the output.
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  variables["batch_stats"] = jax.tree.unflatten(
    treedef, [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5) for k, x in zip(keys, leaves)]
  )
  actual = np.asarray(model.apply(variables, images))
  expected = _torch_resnet18_dc5(variables, images)
  assert actual.shape == expected.shape == (1, 5, 6, 512)
  assert (expected > 0).mean() > 0.1  # not a dead network
  np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize(
  "arch,dilation,stages", [("resnet18", False, 3), ("resnet50", True, 3), ("resnet18", False, 2)]
)
def test_shortened_backbone_is_torchvision_resnet_up_to_its_last_stage(arch, dilation, stages):
  """A torchvision ImageNet-layout ResNet (layer4 and fc included) initialises a backbone that
  stops after layer3 or layer2, whose features are torchvision's output of that stage (dilated:
  layer3 with replace_stride_with_dilation, stride 8)."""
  torch.manual_seed(0)
  resnet = getattr(torchvision.models, arch)(
    weights=None, replace_stride_with_dilation=[False, dilation, False] if dilation else None
  ).eval()
  with torch.no_grad():  # random statistics, so every BatchNorm is visible in the output
    for module in resnet.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
  config = tiny_config(backbone=arch, dilation=dilation, backbone_num_stages=stages)
  variables = convert.from_torch({k: v.numpy() for k, v in resnet.state_dict().items()}, config)
  images = np.random.default_rng(3).normal(size=(1, 72, 104, 3)).astype(np.float32)
  actual = ResNet(arch, dilation, num_stages=stages).apply(
    {
      "params": variables["params"]["backbone"],
      "batch_stats": variables["batch_stats"]["backbone"],
    },
    images,
  )
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")[: 4 + stages]:
      x = getattr(resnet, name)(x)
  expected = x.permute(0, 2, 3, 1).numpy()
  stride = 2 ** (stages + 1) // (2 if dilation else 1)
  channels = 64 * 2 ** (stages - 1) * (4 if arch == "resnet50" else 1)
  assert actual.shape == expected.shape == (1, -(-72 // stride), -(-104 // stride), channels)
  np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_bfloat16_runs_without_nan_and_keeps_float32_params_and_outputs():
  config = tiny_config(dtype="bfloat16")
  model = models.build_model(config)
  images, pad_mask = _inputs()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, pad_mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  out = model.apply(variables, images, pad_mask)
  assert out["pred_logits"].dtype == jnp.float32 and out["pred_boxes"].dtype == jnp.float32
  assert np.all(np.isfinite(out["pred_logits"])) and np.all(np.isfinite(out["pred_boxes"]))
  ref = models.build_model(tiny_config()).apply(variables, images, pad_mask)
  np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"], atol=2e-2)


def test_detr_baseline_decoder_shares_everything_but_the_decoder():
  images, pad_mask = _inputs()
  shapes = {}
  for decoder in ("conditional", "detr"):
    model = models.build_model(tiny_config(decoder=decoder))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, pad_mask)
    out = model.apply(variables, images, pad_mask)
    assert out["pred_logits"].shape == (2, 8, 5) and out["pred_boxes"].shape == (2, 8, 4)
    assert len(out["aux_outputs"]) == 1
    assert np.all((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1))
    shapes[decoder] = jax.tree_util.tree_map(lambda x: x.shape, variables["params"])
  conditional, detr = shapes["conditional"], shapes["detr"]
  assert {k: v for k, v in conditional.items() if k != "decoder"} == {
    k: v for k, v in detr.items() if k != "decoder"
  }
  assert "ref_point_head" in conditional["decoder"] and "ref_point_head" not in detr["decoder"]
  assert set(detr["decoder"]["layers_0"]) == {
    "self_attn",
    "multihead_attn",
    "ffn",
    "norm1",
    "norm2",
    "norm3",
  }


def test_inverse_sigmoid_clamps_as_the_original_and_keeps_saturated_gradients_finite():
  """A reference point at 0 or 1 (sigmoid saturates in float32) must give the original's clamped
  logit, log(1e-5), and finite gradients: without the clamp it is -inf/+inf and NaN gradients."""
  from conddetr_jax.models.detector import inverse_sigmoid
  from tests import hf_reference

  x = np.array([0.0, 1e-7, 0.3, 1.0 - 1e-7, 1.0, 1.5, -0.5], np.float32)
  expected = hf_reference.inverse_sigmoid(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(inverse_sigmoid(jnp.asarray(x)), expected, rtol=1e-6)
  assert np.isclose(expected[0], np.log(1e-5))  # the reference itself: the original's eps
  gradients = jax.grad(lambda v: inverse_sigmoid(v).sum())(jnp.asarray(x))
  assert np.all(np.isfinite(gradients)), gradients
