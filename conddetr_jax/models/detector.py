"""ConditionalDETR: backbone -> 1x1 input projection -> transformer -> class and box heads."""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conddetr_jax.models import convolution, initializers
from conddetr_jax.models.backbone import ResNet, feature_stride
from conddetr_jax.models.position import downsample_mask, sine_position_embedding
from conddetr_jax.models.transformer import (
  MLP,
  ConditionalDecoder,
  DetrDecoder,
  Encoder,
  TransformerConfig,
)

PRIOR_PROB = 0.01  # class bias starts at -log((1 - p) / p) so the focal loss starts stable
INVERSE_SIGMOID_EPS = 1e-5  # the original's util.misc.inverse_sigmoid
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype -> compute dtype
MASK_PADDING = ("eval", "always", "never")  # when the backbone masks padding (train=False, ...)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """The detector's fields, as ``config.model`` names them (configs/default.py declares each, with
  its default and meaning); ``from_config`` copies them all, so a new field is declared in two
  places only: here and in default.py."""

  backbone: str
  dilation: bool
  freeze_stem_and_layer1: bool
  backbone_norm: str
  backbone_num_stages: int
  hidden_dim: int
  nheads: int
  enc_layers: int
  dec_layers: int
  dim_feedforward: int
  dropout: float
  num_queries: int
  num_groups: int
  num_classes: int
  dense_head: bool
  aux_loss: bool
  decoder: str
  mask_padding: str
  dtype: str
  attention: str
  attention_block_size: int
  remat: str

  @classmethod
  def from_config(cls, model_config: Any) -> "DetectorConfig":
    """From ``config.model`` (a ConfigDict or mapping holding every field)."""
    return cls(**{field.name: model_config[field.name] for field in dataclasses.fields(cls)})

  def transformer(self, deterministic: bool) -> TransformerConfig:
    """The encoder's and decoder's ``TransformerConfig``."""
    return TransformerConfig(
      d_model=self.hidden_dim,
      nhead=self.nheads,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      dtype=DTYPES[self.dtype],
      attention=self.attention,
      attention_block_size=self.attention_block_size,
      remat=self.remat,
      deterministic=deterministic,
    )


def inverse_sigmoid(x: jax.Array, eps: float = INVERSE_SIGMOID_EPS) -> jax.Array:
  """log(x / (1 - x)) with both terms clamped at eps, as the original."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class ConditionalDETR(nn.Module):
  """Conditional DETR (Meng et al., ICCV 2021).

  ``__call__(images, pad_mask, train)`` returns ``pred_logits`` (B, Q, C), ``pred_boxes``
  (B, Q, 4) cxcywh in [0, 1] of the unpadded image, both float32, and with ``aux_loss`` the
  list ``aux_outputs`` of the same for every decoder layer but the last. Intermediate tensors
  used by parity tests are sown into the ``intermediates`` collection.

  Group DETR training (Chen et al., ICCV 2023) with ``num_groups`` K > 1: under ``train=True``,
  K groups of ``num_queries`` queries (group 0's embedding ``query_embed``, the others'
  ``group_query_embed``) are decoded together, each self-attending within its group only, so the
  outputs hold K*Q queries (group k at [k*Q, (k+1)*Q)); the criterion matches each group on its
  own. Under ``train=False`` only group 0 runs: outputs, cost and results are those of a 1-group
  model with the same weights, and the extra groups' embeddings just sit in the params.

  A dense auxiliary head (``dense_head``; Co-DETR's one-to-many auxiliary heads, Zong et al., ICCV
  2023, in their simplest form): under ``train=True`` the output also holds ``dense_outputs``, a
  class and box prediction for every encoder token (boxes as offsets from the token's own centre,
  the decoder's parametrisation with the token as its reference point), which the criterion
  trains one-to-many against the targets whose boxes hold the token (``dense_losses``). It only
  adds training signal to the encoder and backbone: under ``train=False`` it is not in the output
  (XLA drops its computation), so inference cost and outputs are those of a model without it.

  ``mask_padding`` (one of ``MASK_PADDING``) says when the backbone masks the padded region
  (backbone.py): under ``train=False`` only ("eval"), always, or never (the original's padded
  forward, whose outputs depend on the padding). Masked, each image's outputs are those of the
  same image alone and unpadded, whatever its batch, canvas or neighbours: the transformer already
  ignores padded keys, and the feature mask is then the backbone's valid extent.

  ``decoder='detr'`` swaps in DETR's decoder (no reference points, boxes = sigmoid(MLP(h))) with
  everything else unchanged: the baseline of the convergence study.

  ``cross_attention_layer`` (None by default: off) names the conditional decoder layer whose
  cross-attention is sown into ``intermediates`` when that collection is collected: the weights
  and logits the model uses and their content and spatial parts (``ConditionalDecoderLayer``;
  read by ``inference.attention_maps``). Parameters are the same either way.
  """

  config: DetectorConfig
  cross_attention_layer: int | None = None  # decoder layer whose cross-attention is sown; None: off

  @nn.compact
  def __call__(self, images: jax.Array, pad_mask: jax.Array, train: bool = False) -> dict[str, Any]:
    """images (B, H, W, 3) ImageNet-normalised; pad_mask (B, H, W) bool, True on padding."""
    if images.ndim != 4 or images.shape[-1] != 3 or pad_mask.shape != images.shape[:3]:
      raise ValueError(
        f"expected images (B,H,W,3) and pad_mask (B,H,W), got {images.shape} and {pad_mask.shape}"
      )
    c = self.config
    d, dtype = c.hidden_dim, DTYPES[c.dtype]
    masked = c.mask_padding == "always" or (c.mask_padding == "eval" and not train)
    backbone = ResNet(
      c.backbone,
      dilation=c.dilation,
      dtype=dtype,
      freeze_stem_and_layer1=c.freeze_stem_and_layer1,
      norm=c.backbone_norm,
      num_stages=c.backbone_num_stages,
      name="backbone",
    )
    features = backbone(images, pad_mask if masked else None)
    batch, h, w, channels = features.shape
    if masked:
      # The backbone's own valid extent, ceil(valid / stride): the unpadded image's feature size,
      # also where the canvas is not a multiple of the stride (where nearest resizing is not).
      stride = feature_stride(c.backbone_num_stages, c.dilation)
      mask = pad_mask[:, ::stride, ::stride]
    else:
      mask = downsample_mask(pad_mask, (h, w))
    pos = sine_position_embedding(mask, d // 2)
    src = nn.Conv(
      d,
      (1, 1),
      dtype=dtype,
      kernel_init=initializers.torch_default_kernel,
      bias_init=initializers.torch_default_bias(channels),
      conv_general_dilated=convolution.conv_general_dilated,
      name="input_proj",
    )(features)
    self.sow("intermediates", "backbone_features", features)
    self.sow("intermediates", "feature_mask", mask)
    self.sow("intermediates", "pos_embed", pos)
    self.sow("intermediates", "projected_features", src)

    src, pos, mask = (
      src.reshape(batch, h * w, d),
      pos.reshape(batch, h * w, d),
      mask.reshape(batch, h * w),
    )
    pos = pos.astype(dtype)
    transformer = c.transformer(deterministic=not train)
    memory = Encoder(transformer, c.enc_layers, name="encoder")(src, pos, mask)
    query_embed = self.param("query_embed", nn.initializers.normal(1.0), (c.num_queries, d))
    groups = 1
    if c.num_groups > 1:
      extra = self.param(
        "group_query_embed", nn.initializers.normal(1.0), ((c.num_groups - 1) * c.num_queries, d)
      )
      if train:
        query_embed, groups = jnp.concatenate([query_embed, extra]), c.num_groups
    query_pos = jnp.broadcast_to(query_embed.astype(dtype), (batch,) + query_embed.shape)
    if c.decoder == "detr":
      if self.cross_attention_layer is not None:
        raise ValueError("cross_attention_layer: the DETR decoder has no conditional spatial query")
      hidden = DetrDecoder(transformer, c.dec_layers, groups, name="decoder")(
        memory, mask, pos, query_pos
      )
      offset = 0.0
    else:
      decoder = ConditionalDecoder(
        transformer, c.dec_layers, groups, record_layer=self.cross_attention_layer, name="decoder"
      )
      hidden, reference = decoder(memory, mask, pos, query_pos)
      # The box head predicts the centre as an offset from the reference point, in logit space.
      offset = jnp.concatenate([inverse_sigmoid(reference), jnp.zeros_like(reference)], axis=-1)
      self.sow("intermediates", "reference_points", reference)
    self.sow("intermediates", "memory", memory)
    self.sow("intermediates", "decoder_hidden", hidden)

    # Heads run in float32: they are tiny, and the logits feed a focal loss and top-k.
    logits = nn.Dense(
      c.num_classes,
      kernel_init=initializers.torch_default_kernel,
      bias_init=nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB)),
      name="class_embed",
    )(hidden)
    delta = MLP(
      d,
      4,
      3,
      jnp.float32,
      initializers.torch_default_kernel,
      last_layer_zero=True,
      name="bbox_embed",
    )(hidden)
    boxes = jax.nn.sigmoid(delta + offset)

    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if c.aux_loss:
      out["aux_outputs"] = [
        {"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])
      ]
    if c.dense_head:
      # Built at init too (train=False), so its params exist; only training outputs carry it.
      dense = self._dense_outputs(memory, mask.reshape(batch, h, w))
      if train:
        out["dense_outputs"] = dense
    return out

  def _dense_outputs(self, memory: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The dense head on the encoder's (B, h*w, d) memory; ``mask`` (B, h, w) True on padding."""
    centres = token_centres(mask)
    logits = nn.Dense(
      self.config.num_classes,
      kernel_init=initializers.torch_default_kernel,
      bias_init=nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB)),
      name="dense_class_embed",
    )(memory)
    delta = MLP(
      self.config.hidden_dim,
      4,
      3,
      jnp.float32,
      initializers.torch_default_kernel,
      last_layer_zero=True,
      name="dense_bbox_embed",
    )(memory)
    offset = jnp.concatenate([inverse_sigmoid(centres), jnp.zeros_like(centres)], axis=-1)
    return {
      "pred_logits": logits,
      "pred_boxes": jax.nn.sigmoid(delta + offset),
      "token_centres": centres,
      "token_valid": ~mask.reshape(mask.shape[0], -1),
    }


def token_centres(mask: jax.Array) -> jax.Array:
  """(B, h*w, 2) float32: each feature cell's centre as (x, y) in [0, 1] of the unpadded image.

  A cell's coordinate is (its index among the valid cells of its row or column + 0.5) / their
  number, the extent the sine position embedding normalises by. Padding cells, which
  ``token_valid`` masks out, get some value in [0, 1].
  """
  not_mask = (~mask).astype(jnp.float32)
  y = jnp.cumsum(not_mask, axis=1)
  x = jnp.cumsum(not_mask, axis=2)
  y = (y - 0.5) / jnp.maximum(y[:, -1:, :], 1.0)
  x = (x - 0.5) / jnp.maximum(x[:, :, -1:], 1.0)
  return jnp.clip(jnp.stack([x, y], axis=-1), 0.0, 1.0).reshape(mask.shape[0], -1, 2)
