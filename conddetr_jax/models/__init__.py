"""Flax modules of Conditional DETR, and the builder from a config."""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from conddetr_jax.models.attention import IMPLEMENTATIONS
from conddetr_jax.models.backbone import NORMS, NUM_STAGES, RESNET_SPECS, is_frozen_backbone_param
from conddetr_jax.models.detector import DTYPES, MASK_PADDING, ConditionalDETR, DetectorConfig
from conddetr_jax.models.transformer import REMAT

_DECODERS = ("conditional", "detr")


def build_model(config: ml_collections.ConfigDict) -> ConditionalDETR:
  """The detector described by ``config.model`` (see configs/default.py), with checked fields."""
  m = config.model
  choices = {
    "backbone": sorted(RESNET_SPECS),
    "backbone_norm": NORMS,
    "backbone_num_stages": NUM_STAGES,
    "dtype": sorted(DTYPES),
    "decoder": _DECODERS,
    "mask_padding": MASK_PADDING,
    "attention": IMPLEMENTATIONS,
    "remat": REMAT,
  }
  for field, allowed in choices.items():
    if m[field] not in allowed:
      raise ValueError(f"config.model.{field}={m[field]!r}: expected one of {tuple(allowed)}")
  for field in ("attention_block_size", "num_groups"):
    if not isinstance(m[field], int) or m[field] < 1:
      raise ValueError(f"config.model.{field}={m[field]!r}: expected an integer >= 1")
  if m.hidden_dim % m.nheads or m.hidden_dim % 2:
    raise ValueError(
      f"config.model.hidden_dim={m.hidden_dim} must be even and divisible by nheads={m.nheads}"
    )
  return ConditionalDETR(DetectorConfig.from_config(m))


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
  """A pytree like ``params`` holding each leaf's ``param_label`` (for
  ``optax.multi_transform``)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: param_label([k.key for k in path], freeze_stem_and_layer1), params
  )
