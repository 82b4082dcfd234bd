"""Flax modules of Conditional DETR, and the builder from a config."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from conddetr_jax.models.attention import IMPLEMENTATIONS
from conddetr_jax.models.backbone import NORMS, NUM_STAGES, RESNET_SPECS, is_frozen_backbone_param
from conddetr_jax.models.detector import MASK_PADDING, ConditionalDETR
from conddetr_jax.models.transformer import REMAT

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_DECODERS = ("conditional", "detr")


def build_model(config: ml_collections.ConfigDict) -> ConditionalDETR:
  """The detector described by ``config.model`` (see configs/default.py), with checked fields."""
  m = config.model
  if m.backbone not in RESNET_SPECS:
    raise ValueError(f"config.model.backbone={m.backbone!r}: expected one of {sorted(RESNET_SPECS)}")
  if m.backbone_norm not in NORMS:
    raise ValueError(f"config.model.backbone_norm={m.backbone_norm!r}: expected one of {NORMS}")
  if m.get("backbone_num_stages", 4) not in NUM_STAGES:
    raise ValueError(f"config.model.backbone_num_stages={m.backbone_num_stages!r}: expected one of {NUM_STAGES}")
  if m.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r}: expected one of {sorted(_DTYPES)}")
  if m.decoder not in _DECODERS:
    raise ValueError(f"config.model.decoder={m.decoder!r}: expected one of {_DECODERS}")
  if m.mask_padding not in MASK_PADDING:
    raise ValueError(f"config.model.mask_padding={m.mask_padding!r}: expected one of "
                     f"{MASK_PADDING}")
  attention, remat = m.get("attention", "dense"), m.get("remat", "none")
  if attention not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={attention!r}: expected one of {IMPLEMENTATIONS}")
  if remat not in REMAT:
    raise ValueError(f"config.model.remat={remat!r}: expected one of {REMAT}")
  block_size = m.get("attention_block_size", 512)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"config.model.attention_block_size={block_size!r}: expected an integer >= 1")
  num_groups = m.get("num_groups", 1)
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"config.model.num_groups={num_groups!r}: expected an integer >= 1")
  if m.hidden_dim % m.nheads or m.hidden_dim % 2:
    raise ValueError(f"config.model.hidden_dim={m.hidden_dim} must be even and divisible by nheads={m.nheads}")
  return ConditionalDETR(backbone=m.backbone, dilation=m.dilation,
                         freeze_stem_and_layer1=m.freeze_stem_and_layer1, backbone_norm=m.backbone_norm,
                         backbone_num_stages=m.get("backbone_num_stages", 4),
                         hidden_dim=m.hidden_dim, nheads=m.nheads,
                         enc_layers=m.enc_layers, dec_layers=m.dec_layers, dim_feedforward=m.dim_feedforward,
                         dropout=m.dropout, num_queries=m.num_queries, num_groups=num_groups,
                         num_classes=m.num_classes, dense_head=m.get("dense_head", False),
                         aux_loss=m.aux_loss, decoder=m.decoder, mask_padding=m.mask_padding,
                         dtype=_DTYPES[m.dtype],
                         attention=attention, attention_block_size=block_size, remat=remat)


def init_variables(model: ConditionalDETR, rng: jax.Array, *, abstract: bool = False) -> Any:
  """The model's initial ``{'params', 'batch_stats'}``; no tensor depends on the input size, so
  a tiny dummy image is used. ``abstract=True`` returns ``jax.ShapeDtypeStruct`` leaves without
  computing (or compiling) anything."""
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  pad_mask = jnp.zeros((1, 64, 64), bool)
  if abstract:
    return jax.eval_shape(model.init, rng, images, pad_mask)
  return jax.jit(model.init)(rng, images, pad_mask)


def param_label(path: Sequence[str], freeze_stem_and_layer1: bool = True) -> str:
  """The optimiser group of a parameter: 'frozen' (stem, layer1), 'backbone', or 'transformer'.

  ``path`` is the key path inside ``variables['params']``, e.g. ('backbone', 'layer2_0', 'conv1',
  'kernel'). BatchNorm tensors are not parameters (they live in ``batch_stats``). With
  ``freeze_stem_and_layer1=False`` (config.model's field) nothing is 'frozen'.
  """
  if path[0] != "backbone":
    return "transformer"
  return "frozen" if freeze_stem_and_layer1 and is_frozen_backbone_param(path[1:]) else "backbone"


def param_labels(params: Any, freeze_stem_and_layer1: bool = True) -> Any:
  """A pytree like ``params`` holding each leaf's ``param_label`` (for ``optax.multi_transform``)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_label([k.key for k in path], freeze_stem_and_layer1), params)
