"""Independent PyTorch reference for parity tests: HF transformers' Conditional DETR.

Builds `transformers.ConditionalDetrForObjectDetection` (CPU, eager attention, timm ResNet
backbone with frozen BatchNorm, the same module names as the original's torchvision ResNet) with
seeded random weights that are strong enough to tell queries apart, runs it on channels-last
numpy images with the original's padding mask, and exports its weights under three key layouts:
HF 5.x (in memory), HF 4.x (on disk: what `save_pretrained` writes and what
microsoft/conditional-detr-resnet-50 ships) and the original repo's (Atten4Vis/ConditionalDETR).

HF differs from the original in two places this module works around:
- with `auxiliary_loss=True` HF feeds the layer-normed decoder state to the next layer and to
  `query_scale`, the original the un-normed one; so the model runs with `auxiliary_loss=False`
  and the per-layer outputs are rebuilt here from the raw decoder-layer outputs, as the
  original's `intermediate` (LayerNorm, class head, box head on the reference points);
- HF's own ResNet ignores `dilation`; the timm backbone honours it (DC5: stride 16).

Importing timm imports torchvision: under pytest, tests/conftest.py first declares the
torchvision ops that PyPI's CUDA wheel fails to register next to the CPU torch.
"""

import dataclasses
import math
import re

import numpy as np
import torch
from torch import nn
from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection
from transformers.models.conditional_detr.modeling_conditional_detr import (
  ConditionalDetrFrozenBatchNorm2d,
  ConditionalDetrObjectDetectionOutput,
)

# The original's `util.misc.inverse_sigmoid` clamps at 1e-5 (HF's copy does too).
INVERSE_SIGMOID_EPS = 1e-5
# Focal-loss prior of the original's class head: bias = -log((1 - 0.01) / 0.01).
_CLASS_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


@dataclasses.dataclass(frozen=True)
class Reference:
  """A built reference model.

  Attributes:
    model: the HF detector, in eval mode, float32, CPU.
    config: its config (`num_labels` classes, `num_queries`, layer counts, ...).
  """

  model: ConditionalDetrForObjectDetection
  config: ConditionalDetrConfig


# HF ConditionalDetrConfig's keyword for each transformer size of this project's config.model.
_HF_SIZE_NAMES = (
  ("d_model", "hidden_dim"),
  ("encoder_layers", "enc_layers"),
  ("decoder_layers", "dec_layers"),
  ("encoder_attention_heads", "nheads"),
  ("decoder_attention_heads", "nheads"),
  ("encoder_ffn_dim", "dim_feedforward"),
  ("decoder_ffn_dim", "dim_feedforward"),
)


def transformer_sizes(model_config) -> dict[str, int]:
  """``config.model``'s transformer sizes (width, layers, heads, FFN width) as HF
  ``ConditionalDetrConfig`` keywords, for a reference of the same shape as the JAX model."""
  return {hf: model_config[ours] for hf, ours in _HF_SIZE_NAMES}


def build_reference(
  backbone: str = "resnet50",
  dilation: bool = False,
  num_classes: int = 91,
  num_queries: int = 300,
  seed: int = 0,
  **small,
) -> Reference:
  """Builds the HF Conditional DETR with strong seeded random weights.

  Args:
    backbone: timm ResNet name ("resnet50", "resnet101").
    dilation: DC5 (layer4 dilated, features at stride 16) instead of stride 32.
    num_classes: class-head outputs (the original's num_classes, 91 for COCO).
    num_queries: object queries.
    seed: seeds every weight, so equal seeds give equal models.
    **small: other `ConditionalDetrConfig` fields to shrink the model for fast tests, e.g.
      `encoder_layers=2, decoder_layers=3`. Defaults are the original's sizes (hidden 256,
      8 heads, FFN 2048, 6 + 6 layers).

  Returns:
    The reference; every parameter and buffer is drawn from `seed` (see `_randomise`).
  """
  config = ConditionalDetrConfig(
    num_labels=num_classes,
    num_queries=num_queries,
    backbone=backbone,
    dilation=dilation,
    use_timm_backbone=True,
    use_pretrained_backbone=False,
    auxiliary_loss=False,
    attn_implementation="eager",
    **small,
  )
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    model = ConditionalDetrForObjectDetection(config)
  model.eval()
  _randomise(model, torch.Generator().manual_seed(seed))
  return Reference(model=model, config=config)


# Attention query/key projections get 2x Xavier: scores then have std ~4 instead of ~1, so
# attention is peaked enough that neither the encoder's tokens nor the decoder's queries average
# into one vector (with plain Xavier the decoder's 300 outputs agree to ~1e-3 after six layers).
# Sharper attention (4x: score std ~100 in the encoder) turns float32 rounding into 1e-3 logit
# differences between two correct implementations, i.e. the test would measure chaos, not bugs.
_ATTENTION_QK = re.compile(
  r"(self_attn\.[qk]_proj|[qk]_content_proj|[qk]_pos_proj|q_pos_sine_proj)$"
)
_ATTENTION_QK_GAIN = 2.0
# 2x class head: logits differ between queries by ~0.01-0.03, >100x the 1e-4 parity tolerance.
_CLASS_HEAD_GAIN = 2.0


def _randomise(model: ConditionalDetrForObjectDetection, generator: torch.Generator) -> None:
  """Replaces every weight with seeded noise that keeps activations O(1) and queries distinct.

  HF's init leaves LayerNorms at 1/0, biases and the last box layer at 0 and the query
  embeddings at std 0.02: the decoder then collapses (all queries nearly equal), and a parity
  test could not see a wrong spatial query. Instead:
  - Linear: Xavier-uniform weights (the original's transformer init; 2x for attention queries
    and keys, see `_ATTENTION_QK`), N(0, 0.02) biases (larger constant offsets wash out the
    differences between queries);
  - Conv: He-normal weights, N(0, 0.02) biases;
  - LayerNorm: weight U(0.5, 1.5), bias N(0, 0.1);
  - query embeddings N(0, 1) (nn.Embedding's default, as in the original);
  - class head: 2x Xavier weights and the original's focal prior plus N(0, 0.1) as bias, so
    logits differ between queries by ~0.01-0.03;
  - reference-point head: 2x Xavier on its last layer, so reference points spread over
    ~[0.01, 0.99] instead of ~[0.1, 0.9];
  - box head: 2x Xavier on its last layer (zero in the original), so widths and heights, which
    have no reference-point offset, differ between queries too, and its bias calibrated (see
    `_calibrate`) so that boxes do not saturate at 0 or 1;
  - frozen BatchNorm: weight U(0.5, 1.5), bias N(0, 0.1), running statistics and the input
    projection calibrated on a seeded random batch (see `_calibrate`).
  """

  def normal(shape, std, mean=0.0):
    return torch.randn(shape, generator=generator) * std + mean

  def uniform(shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=generator)

  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, nn.Linear):
        gain = _ATTENTION_QK_GAIN if _ATTENTION_QK.search(name) else 1.0
        limit = gain * math.sqrt(6.0 / (module.in_features + module.out_features))
        module.weight.copy_(uniform(module.weight.shape, -limit, limit))
        module.bias.copy_(normal(module.bias.shape, 0.02))
      elif isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(normal(module.weight.shape, math.sqrt(2.0 / fan_in)))
        if module.bias is not None:
          module.bias.copy_(normal(module.bias.shape, 0.02))
      elif isinstance(module, (nn.LayerNorm, ConditionalDetrFrozenBatchNorm2d)):
        module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
        module.bias.copy_(normal(module.bias.shape, 0.1))
      elif isinstance(module, nn.Embedding):
        module.weight.copy_(normal(module.weight.shape, 1.0))
    classifier = model.class_labels_classifier
    classifier.weight.mul_(_CLASS_HEAD_GAIN)
    classifier.bias.copy_(normal(classifier.bias.shape, 0.1, _CLASS_PRIOR_BIAS))
    model.model.decoder.ref_point_head.layers[-1].weight.mul_(2.0)
    model.bbox_predictor.layers[-1].weight.mul_(2.0)
    _calibrate(model, generator)


def _calibrate(model: ConditionalDetrForObjectDetection, generator: torch.Generator) -> None:
  """Sets frozen-BN statistics and the input projection from a seeded random batch.

  A random 50-layer ResNet with BN statistics 0/1 explodes or dies; its last-stage features
  also share a large per-channel offset that, projected, swamps the position embedding and
  makes all encoder tokens alike. So each BN gets its input's per-channel mean (plus noise)
  and variance (times U(0.5, 1.5)), and the input projection is rescaled to unit output
  variance with the batch mean mostly removed. One forward pass sets all BNs: a pre-hook sets
  each just before it runs, after all the BNs before it. Finally the box head's last bias
  absorbs the mean box delta, which the decoder's outputs share across queries and which would
  otherwise push boxes into the flat ends of the sigmoid.
  """

  def calibrate(module, inputs):
    x = inputs[0]
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
    module.running_mean.copy_(
      mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=generator)
    )
    module.running_var.copy_(var * (0.5 + torch.rand(var.shape, generator=generator)) + 1e-3)

  norms = [m for m in model.modules() if isinstance(m, ConditionalDetrFrozenBatchNorm2d)]
  handles = [m.register_forward_pre_hook(calibrate) for m in norms]
  try:
    images = torch.randn((2, 3, 128, 128), generator=generator)
    features = model.model.backbone.model(images)[-1]
  finally:
    for handle in handles:
      handle.remove()
  projection = model.model.input_projection
  projected = projection(features)
  mean, std = projected.mean(dim=(0, 2, 3)), projected.std(dim=(0, 2, 3))
  noise = 0.1 * torch.randn(mean.shape, generator=generator)
  projection.weight.div_(std[:, None, None, None])
  projection.bias.copy_((projection.bias - mean) / std + noise)

  deltas = []
  handle = model.bbox_predictor.register_forward_hook(lambda m, i, output: deltas.append(output))
  try:
    model(pixel_values=images)
  finally:
    handle.remove()
  model.bbox_predictor.layers[-1].bias.sub_(deltas[0].mean(dim=(0, 1)))


def padded_batch(
  sizes: tuple[tuple[int, int], ...] = ((128, 160), (96, 112)), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Random normalised images of the given (height, width) sizes, zero-padded to the largest.

  The default sizes leave padded cells in the feature maps at stride 32 and at stride 16.

  Returns:
    images (B, H, W, 3) float32, zero on padding; pad_mask (B, H, W) bool, True on padding.
  """
  rng = np.random.default_rng(seed)
  height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
  images = np.zeros((len(sizes), height, width, 3), np.float32)
  pad_mask = np.ones((len(sizes), height, width), bool)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    pad_mask[i, :h, :w] = False
  return images, pad_mask


def _nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).detach().numpy().astype(np.float32)


def forward_with_captures(
  ref: Reference,
  images_nhwc: np.ndarray,
  pad_mask: np.ndarray,
) -> tuple[ConditionalDetrObjectDetectionOutput, dict]:
  """Runs the HF model once and records the intermediate tensors the parity tests need.

  Args:
    ref: from `build_reference`.
    images_nhwc: (B, H, W, 3) float32, already ImageNet-normalised, zero on padding.
    pad_mask: (B, H, W) bool, True on padded pixels (the original's convention; HF's
      `pixel_mask` is its negation).

  Returns:
    (hf_outputs, captures): HF's `ConditionalDetrObjectDetectionOutput` (with
    `decoder_hidden_states`), and torch tensors: `features` (B, C, h, w) last backbone stage,
    `valid_mask` (B, h, w) bool True on valid cells, `pos_embed` (B, 256, h, w),
    `input_proj` (B, 256, h, w), `decoder_layers` list of L raw layer outputs (B, Q, 256)
    before the final LayerNorm, `reference_points` (Q, B, 2) after the sigmoid.
  """
  pixel_values = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
  pixel_mask = torch.from_numpy(~np.asarray(pad_mask, bool)).long()
  model = ref.model.model
  captures = {"decoder_layers": []}

  def keep(name):
    def hook(module, inputs, output):
      captures[name] = output

    return hook

  def keep_backbone(module, inputs, output):
    captures["features"], captures["valid_mask"] = output[-1]

  def keep_decoder(module, inputs, output):
    captures["reference_points"] = output.reference_points

  def keep_layer(module, inputs, output):
    captures["decoder_layers"].append(output)

  handles = [
    model.backbone.register_forward_hook(keep_backbone),
    model.position_embedding.register_forward_hook(keep("pos_embed")),
    model.input_projection.register_forward_hook(keep("input_proj")),
    model.decoder.register_forward_hook(keep_decoder),
  ] + [layer.register_forward_hook(keep_layer) for layer in model.decoder.layers]
  try:
    with torch.no_grad():
      outputs = ref.model(
        pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True
      )
  finally:
    for handle in handles:
      handle.remove()
  return outputs, captures


def inverse_sigmoid(x: torch.Tensor, eps: float = INVERSE_SIGMOID_EPS) -> torch.Tensor:
  """log(x / (1 - x)) with both terms clamped at `eps`, as the original. Any shape."""
  x = x.clamp(min=0, max=1)
  return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def run_reference(
  ref: Reference, images_nhwc: np.ndarray, pad_mask: np.ndarray
) -> dict[str, np.ndarray]:
  """Runs the reference and returns the original model's intermediate and final outputs.

  Args:
    ref: from `build_reference`.
    images_nhwc: (B, H, W, 3) float32, already ImageNet-normalised, zero on padding.
    pad_mask: (B, H, W) bool, True on padded pixels.

  Returns:
    float32 numpy arrays (bool for `feature_mask`), L decoder layers, Q queries, C classes:
    `backbone_features` (B, h, w, 2048), `feature_mask` (B, h, w) True on padding,
    `pos_embed` (B, h, w, 256), `input_proj` (B, h, w, 256), `memory` (B, h*w, 256),
    `decoder_hidden` (L, B, Q, 256) after the decoder's final LayerNorm,
    `reference_points` (B, Q, 2), `pred_logits` (B, Q, C), `pred_boxes` (B, Q, 4) cxcywh,
    `aux_logits` (L-1, B, Q, C), `aux_boxes` (L-1, B, Q, 4).
  """
  outputs, captures = forward_with_captures(ref, images_nhwc, pad_mask)
  model = ref.model
  with torch.no_grad():
    hidden = torch.stack([model.model.decoder.layernorm(h) for h in captures["decoder_layers"]])
    reference = captures["reference_points"].transpose(0, 1)
    logits = model.class_labels_classifier(hidden)
    deltas = model.bbox_predictor(hidden)
    offset = torch.cat([inverse_sigmoid(reference), torch.zeros_like(reference)], dim=-1)
    boxes = (deltas + offset).sigmoid()
  as_np = lambda x: x.detach().numpy().astype(np.float32)
  return {
    "backbone_features": _nchw_to_nhwc(captures["features"]),
    "feature_mask": ~captures["valid_mask"].numpy(),
    "pos_embed": _nchw_to_nhwc(captures["pos_embed"]),
    "input_proj": _nchw_to_nhwc(captures["input_proj"]),
    "memory": as_np(outputs.encoder_last_hidden_state),
    "decoder_hidden": as_np(hidden),
    "reference_points": as_np(reference),
    "pred_logits": as_np(logits[-1]),
    "pred_boxes": as_np(boxes[-1]),
    "aux_logits": as_np(logits[:-1]),
    "aux_boxes": as_np(boxes[:-1]),
  }


def cross_attention_weights(
  ref: Reference, images_nhwc: np.ndarray, pad_mask: np.ndarray
) -> np.ndarray:
  """Each decoder layer's cross-attention weights, as HF returns them with `output_attentions=True`.

  Args:
    ref: from `build_reference`.
    images_nhwc: (B, H, W, 3) float32, already ImageNet-normalised, zero on padding.
    pad_mask: (B, H, W) bool, True on padded pixels.

  Returns:
    (L, B, heads, Q, h*w) float32: softmax weights over the feature map's cells in row-major
    order (HF's `cross_attentions`, the softmax before dropout).
  """
  pixel_values = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
  pixel_mask = torch.from_numpy(~np.asarray(pad_mask, bool)).long()
  with torch.no_grad():
    outputs = ref.model(pixel_values=pixel_values, pixel_mask=pixel_mask, output_attentions=True)
  return np.stack([a.detach().numpy().astype(np.float32) for a in outputs.cross_attentions])


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
  """Applies the first rule whose pattern matches `key`; None when none does."""
  for pattern, replacement in rules:
    if re.search(pattern, key):
      return re.sub(pattern, replacement, key)
  return None


# transformers 5.x module names -> the 4.x names that `save_pretrained` writes and that HF's
# checkpoints (microsoft/conditional-detr-resnet-50) hold: the inverse of the
# "ConditionalDetrModel" renamings in transformers' conversion_mapping.py. Names no rule
# matches are the same in both (e.g. the encoder's self_attn.q_proj).
_HF5_TO_HF4 = [
  (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
  (r"\.(self_attn|encoder_attn)\.o_proj\.", r".\1.out_proj."),
  (r"\.layers\.(\d+)\.mlp\.(fc[12])\.", r".layers.\1.\2."),
  (
    r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qk])_(content|pos)_proj\.",
    r"model.decoder.layers.\1.sa_\2\3_proj.",
  ),
  (r"^model\.decoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"model.decoder.layers.\1.sa_v_proj."),
  (
    r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.([qk])_(content|pos)_proj\.",
    r"model.decoder.layers.\1.ca_\2\3_proj.",
  ),
  (
    r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.v_proj\.",
    r"model.decoder.layers.\1.ca_v_proj.",
  ),
  (
    r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.q_pos_sine_proj\.",
    r"model.decoder.layers.\1.ca_qpos_sine_proj.",
  ),
]

# HF 4.x names (without the "model." prefix of the base model) -> the original's: the inverse
# of `rename_keys` and `rename_backbone_keys` in HF's
# convert_conditional_detr_original_pytorch_checkpoint_to_pytorch.py. The encoder's separate
# q/k/v projections are packed back by `original_state_dict` (the inverse of `read_in_q_k_v`).
_HF4_TO_ORIGINAL = [
  (r"^backbone\.conv_encoder\.model\.", "backbone.0.body."),
  (r"^input_projection\.", "input_proj."),
  (r"^query_position_embeddings\.", "query_embed."),
  (r"^class_labels_classifier\.", "class_embed."),
  (r"^bbox_predictor\.", "bbox_embed."),
  (r"^decoder\.layernorm\.", "transformer.decoder.norm."),
  (r"^(encoder|decoder)\.layers\.(\d+)\.fc([12])\.", r"transformer.\1.layers.\2.linear\3."),
  (
    r"^(encoder|decoder)\.layers\.(\d+)\.self_attn_layer_norm\.",
    r"transformer.\1.layers.\2.norm1.",
  ),
  (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
  (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
  (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
  (
    r"^decoder\.layers\.(\d+)\.encoder_attn\.out_proj\.",
    r"transformer.decoder.layers.\1.cross_attn.out_proj.",
  ),
  # Same names under "transformer.": self_attn.out_proj, sa_*/ca_* projections, query_scale,
  # ref_point_head.
  (r"^(encoder|decoder)\.", r"transformer.\1."),
]
_ENCODER_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def hf_state_dict(ref: Reference) -> dict[str, np.ndarray]:
  """The model's weights under transformers 5.x names, as in memory.

  E.g. `model.backbone.model.layer1.0.bn1.running_mean`,
  `model.encoder.layers.0.self_attn.q_proj.weight`, `model.encoder.layers.0.mlp.fc1.weight`,
  `model.decoder.layers.0.self_attn.q_content_proj.weight`,
  `model.decoder.layers.0.encoder_attn.q_pos_sine_proj.weight`, `class_labels_classifier.bias`.
  Shapes are PyTorch's (Linear (out, in), Conv (out, in, kh, kw)); no num_batches_tracked.
  """
  return {k: v.detach().numpy().copy() for k, v in ref.model.state_dict().items()}


def hf_state_dict_on_disk(ref: Reference) -> dict[str, np.ndarray]:
  """The model's weights under transformers 4.x names, the layout of HF's checkpoint files.

  Differences to `hf_state_dict`: `model.backbone.conv_encoder.model.*` for the ResNet,
  `out_proj` for `o_proj`, `layers.N.fc1` for `layers.N.mlp.fc1`, and the decoder's
  projections as flat `sa_qcontent_proj`, `sa_qpos_proj`, `sa_kcontent_proj`, `sa_kpos_proj`,
  `sa_v_proj`, `ca_qcontent_proj`, `ca_qpos_proj` (layer 0), `ca_kcontent_proj`,
  `ca_kpos_proj`, `ca_v_proj`, `ca_qpos_sine_proj` beside `self_attn`/`encoder_attn.out_proj`.
  """
  return {_rename(k, _HF5_TO_HF4) or k: v for k, v in hf_state_dict(ref).items()}


def original_state_dict(ref: Reference) -> dict[str, np.ndarray]:
  """The model's weights under the original repo's names (Atten4Vis/ConditionalDETR).

  E.g. `backbone.0.body.layer1.0.bn1.running_mean`, `input_proj.weight`, `query_embed.weight`,
  `transformer.encoder.layers.0.self_attn.in_proj_weight` (768, 256) = q, k, v stacked,
  `transformer.decoder.layers.0.sa_qcontent_proj.weight`,
  `transformer.decoder.layers.0.cross_attn.out_proj.weight`, `transformer.decoder.norm.weight`,
  `class_embed.weight`, `bbox_embed.layers.2.bias`. Like the original's `state_dict()`, it has
  no `num_batches_tracked` (FrozenBatchNorm2d) and no position-embedding entries (sine).
  """
  original, qkv = {}, {}
  for key, value in hf_state_dict_on_disk(ref).items():
    key = key.removeprefix("model.")
    match = _ENCODER_QKV.match(key)
    if match:
      layer, part, kind = match.groups()
      qkv.setdefault((layer, kind), {})[part] = value
      continue
    new_key = _rename(key, _HF4_TO_ORIGINAL)
    if new_key is None:
      raise ValueError(f"no original name for HF key {key!r}")
    original[new_key] = value
  for (layer, kind), parts in sorted(qkv.items()):
    packed = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    original[f"transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = packed
  return original
