"""Checkpoint conversion: the original's .pth, torchvision ResNets and HF weights -> Flax variables.

Every supported layout is first renamed to the original repository's state-dict keys
(``backbone.0.body.layer1.0.conv1.weight``, ``transformer.decoder.layers.0.ca_qpos_proj.weight``,
``class_embed.bias`` ...); one table then maps those keys onto the Flax variable tree:

- the original's checkpoint: ``{'model': state_dict, ...}`` as its main.py saves it, or a bare
  state dict (a file, or a dict of arrays);
- a torchvision ImageNet ResNet (``conv1.weight``, ``layer1.0...``, ``fc.*``): the backbone only,
  everything else keeps the model's own initialisation (training from scratch starts here);
- Hugging Face ``ConditionalDetrForObjectDetection`` with the timm backbone (the layout of
  ``microsoft/conditional-detr-resnet-50``), in the 4.x key names stored on disk and the 5.x names
  used in memory, from ``.safetensors`` (no torch needed) or ``.bin``.

torch is imported only to read ``.pth``/``.bin`` files.

CLI: ``python -m conddetr_jax.convert --config=configs/r50.py --torch=conddetr_r50.pth --out=DIR``
writes an Orbax checkpoint of the variables that eval.py and ``config.init_from`` restore
(``weights.load_variables``).
"""

import argparse
import io
import logging
import os
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conddetr_jax import storage

StateDict = dict[str, np.ndarray]

# Keys a checkpoint may carry that have no counterpart in the model.
_IGNORED = re.compile(r"(.*num_batches_tracked$)|(^fc\.(weight|bias)$)")
CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.bias")
GROUP_QUERY_KEY = "group_query_embed.weight"
DENSE_HEAD_PREFIXES = ("dense_class_embed.", "dense_bbox_embed.")  # config.model.dense_head


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model built from the config."""


# ----------------------------------------------------------------------------- reading files


def _torch_load(path: str, source: Any) -> Any:
  """``torch.load`` of ``source`` (``path`` or its bytes), for messages named ``path``."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch (pip install torch, the CPU build is enough); "
      ".safetensors files load without it"
    ) from e
  # The original saves its argparse.Namespace next to the weights; allow just that class.
  with torch.serialization.safe_globals([argparse.Namespace]):
    return torch.load(source, map_location="cpu", weights_only=True)


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> StateDict:
  """A flat {key: float32 numpy array} from a file (.pth/.pt/.bin/.safetensors) or a mapping.

  The original's ``{'model': state_dict, 'optimizer': ...}`` wrapper is unwrapped.
  """
  if isinstance(path_or_state_dict, Mapping):
    raw = path_or_state_dict
  else:
    path = os.fspath(path_or_state_dict)
    if not storage.path(path).is_file():
      raise FileNotFoundError(f"checkpoint file not found: {path}")
    # A file in a bucket is read whole into memory (the readers take bytes); a local one by name.
    contents = storage.read_bytes(path) if storage.is_remote(path) else None
    if path.endswith(".safetensors"):
      from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top

      raw = safetensors_np.load_file(path) if contents is None else safetensors_np.load(contents)
    else:
      raw = _torch_load(path, path if contents is None else io.BytesIO(contents))
  if "model" in raw and isinstance(raw["model"], Mapping):
    raw = raw["model"]
  elif "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
    raw = raw["state_dict"]
  out = {}
  for key, value in raw.items():
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu().float().numpy()
    out[key] = np.asarray(value, dtype=np.float32)
  return out


# ----------------------------------------------------------------------------- layouts


def detect_layout(state: StateDict) -> str:
  """'original', 'torchvision' or 'hf', from the key names."""
  keys = state.keys()
  if any(k.startswith(("transformer.", "backbone.0.body.")) for k in keys):
    return "original"
  if any(k.startswith(("model.", "class_labels_classifier.", "bbox_predictor.")) for k in keys):
    return "hf"
  if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
    return "torchvision"
  raise CheckpointMismatchError(
    "unrecognised checkpoint layout: expected the original's keys (transformer.*, "
    "backbone.0.body.*), a torchvision ResNet (conv1.weight, layer1.*) or HF ConditionalDetr "
    f"(model.*); first keys: {sorted(keys)[:8]}"
  )


# HF 5.x in-memory names -> HF 4.x names as stored on disk (inverse of transformers'
# conversion_mapping for ConditionalDetrModel).
_HF5_TO_HF4 = [
  (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
  (
    r"decoder\.layers\.(\d+)\.self_attn\.(q_content|q_pos|k_content|k_pos)_proj\.",
    lambda m: f"decoder.layers.{m[1]}.sa_{m[2].replace('_', '', 1)}_proj.",
  ),
  (r"decoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"decoder.layers.\1.sa_v_proj."),
  (
    r"decoder\.layers\.(\d+)\.encoder_attn\.(q_content|q_pos|k_content|k_pos|q_pos_sine)_proj\.",
    lambda m: f"decoder.layers.{m[1]}.ca_{m[2].replace('_', '', 1)}_proj.",
  ),
  (r"decoder\.layers\.(\d+)\.encoder_attn\.v_proj\.", r"decoder.layers.\1.ca_v_proj."),
  (r"\.o_proj\.", ".out_proj."),
  (r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2."),
]

# HF 4.x names -> the original's names (inverse of HF's conversion script for this model).
_HF4_TO_ORIGINAL = [
  (r"^model\.backbone\.conv_encoder\.model\.", "backbone.0.body."),
  (r"^model\.input_projection\.", "input_proj."),
  (r"^model\.query_position_embeddings\.", "query_embed."),
  (r"^class_labels_classifier\.", "class_embed."),
  (r"^bbox_predictor\.", "bbox_embed."),
  (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
  (r"^model\.(encoder|decoder)\.", r"transformer.\1."),
  (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
  (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
  (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
  (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
  (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
  (r"(decoder\.layers\.\d+)\.encoder_attn\.out_proj\.", r"\1.cross_attn.out_proj."),
  (r"(layers\.\d+)\.fc1\.", r"\1.linear1."),
  (r"(layers\.\d+)\.fc2\.", r"\1.linear2."),
]


def _rename(key: str, rules) -> str:
  for pattern, replacement in rules:
    key = re.sub(pattern, replacement, key)
  return key


def hf_to_original(state: StateDict) -> StateDict:
  """HF ConditionalDetr weights (4.x or 5.x key names) renamed to the original's keys.

  The encoder's separate q/k/v projections are packed into ``in_proj_weight``/``in_proj_bias``
  as torch's nn.MultiheadAttention stores them.
  """
  if any(
    ".backbone.conv_encoder.model.embedder" in k or ".backbone.model.embedder" in k for k in state
  ):
    raise CheckpointMismatchError(
      "this HF checkpoint uses HF's own ResNet backbone (use_timm_backbone=False); "
      "only the timm-backbone layout (as microsoft/conditional-detr-resnet-50) is supported"
    )
  renamed = {_rename(_rename(k, _HF5_TO_HF4), _HF4_TO_ORIGINAL): v for k, v in state.items()}
  out = {}
  packed = {}
  for key, value in renamed.items():
    m = re.match(
      r"^(transformer\.encoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)$", key
    )
    if m:
      packed.setdefault((m[1], m[3]), {})[m[2]] = value
    else:
      out[key] = value
  for (prefix, kind), parts in packed.items():
    if set(parts) != {"q", "k", "v"}:
      raise CheckpointMismatchError(f"{prefix}: q/k/v projections incomplete ({sorted(parts)})")
    out[f"{prefix}.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def to_original_layout(state: StateDict) -> tuple[StateDict, str]:
  """(state dict in the original's key names, detected layout)."""
  layout = detect_layout(state)
  if layout == "hf":
    return hf_to_original(state), layout
  if layout == "torchvision":
    return {f"backbone.0.body.{k}": v for k, v in state.items() if not _IGNORED.match(k)}, layout
  return dict(state), layout


# ----------------------------------------------------------------------------- original -> Flax


def original_key(collection: str, path: tuple[str, ...]) -> str:
  """The original's state-dict key of a Flax variable (without the q/k/v slicing of in_proj).

  e.g. ('params', ('encoder', 'layers_0', 'ffn', 'linear1', 'kernel')) ->
  'transformer.encoder.layers.0.linear1.weight'.
  """
  if path == ("query_embed",):
    return "query_embed.weight"
  if path == (
    "group_query_embed",
  ):  # Group DETR's extra query groups (config.model.num_groups > 1)
    return "group_query_embed.weight"
  parts = []
  for i, name in enumerate(path):
    if i == 0 and name == "backbone":
      parts.append("backbone.0.body")
    elif i == 0 and name in ("encoder", "decoder"):
      parts.append(f"transformer.{name}")
    elif name == "ffn":
      continue
    elif name == "downsample_conv":
      parts.append("downsample.0")
    elif name == "downsample_bn":
      parts.append("downsample.1")
    elif re.fullmatch(r"(layers|layer\d)_\d+", name):
      parts.append(name.replace("_", "."))
    elif name in ("q_proj", "k_proj", "v_proj"):
      parts.append("in_proj")
    else:
      parts.append(name)
  leaf = parts.pop()
  if parts[-1] == "in_proj":  # packed nn.MultiheadAttention projection
    parts[-1] = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
    return ".".join(parts)
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(
    leaf, leaf
  )
  return ".".join(parts + [leaf])


def _to_flax(
  path: tuple[str, ...], value: np.ndarray, expected_shape: tuple[int, ...]
) -> np.ndarray:
  """Transform the original's tensor into the Flax layout of ``path`` (transposes, in_proj
  slices)."""
  proj = path[-2] if len(path) > 1 else ""
  if proj in ("q_proj", "k_proj", "v_proj"):
    d = expected_shape[-1]
    start = "qkv".index(proj[0]) * d
    value = value[start : start + d]
  if path[-1] == "kernel":
    if value.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # linear (out, in) -> (in, out)
      value = value.T
  return value


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return {tuple(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def load_into(
  state: StateDict,
  variables: Any,
  *,
  skip_class_head: bool = False,
  allow_missing_prefixes: tuple[str, ...] = (),
  unused_prefixes: tuple[str, ...] = (),
) -> Any:
  """Fill ``variables`` (a Flax tree with 'params' and 'batch_stats') from an original-layout dict.

  Args:
    state: the original's keys -> arrays.
    variables: the model's initial variables; they define the expected keys and shapes.
    skip_class_head: keep the initial class head when the checkpoint's class count differs.
    allow_missing_prefixes: original-key prefixes that may be absent (they keep their initial
      values), e.g. everything outside the backbone for a torchvision ImageNet checkpoint.
    unused_prefixes: original-key prefixes the model has no place for and may skip, e.g. an ImageNet
      ResNet's layer4 for a backbone that stops after layer3 (layer3 and layer4 after layer2).
  Raises:
    CheckpointMismatchError listing missing keys, unexpected keys and shape mismatches.
  """
  flat = _flat(variables)
  used, missing, mismatched, kept = set(), [], [], []
  new = {}
  for full_path, init_value in flat.items():
    collection, path = full_path[0], full_path[1:]
    key = original_key(collection, path)
    if key not in state:
      if key.startswith(allow_missing_prefixes):
        new[full_path] = init_value
        kept.append(key)
      else:
        missing.append(key)
      continue
    used.add(key)
    value = _to_flax(path, state[key], init_value.shape)
    if value.shape != init_value.shape:
      if skip_class_head and key in CLASS_HEAD_KEYS:
        logging.warning(
          "%s: checkpoint shape %s, model %s: keeping the freshly initialised class head "
          "(config.init.skip_class_head=True)",
          key,
          state[key].shape,
          init_value.shape,
        )
        new[full_path] = init_value
        continue
      mismatched.append(
        f"{key}: checkpoint {tuple(state[key].shape)} -> {value.shape}, model {init_value.shape}"
      )
      continue
    new[full_path] = jnp.asarray(value, dtype=init_value.dtype)
  unexpected = sorted(
    k
    for k in state
    if k not in used and not _IGNORED.match(k) and not k.startswith(unused_prefixes)
  )
  if missing or unexpected or mismatched:
    lines = ["checkpoint does not match the model built from the config:"]
    for title, items in (
      ("missing keys", missing),
      ("unexpected keys", unexpected),
      ("shape mismatches", mismatched),
    ):
      if items:
        lines.append(
          f"  {title} ({len(items)}): "
          + ", ".join(items[:20])
          + (" ..." if len(items) > 20 else "")
        )
    if any(k.split(":")[0] in CLASS_HEAD_KEYS for k in mismatched):
      lines.append(
        "  the class head differs in num_classes: set config.init.skip_class_head=True to "
        "re-initialise it, or config.model.num_classes to the checkpoint's"
      )
    raise CheckpointMismatchError("\n".join(lines))
  if kept:
    logging.info("%d tensors not in the checkpoint keep their initial values", len(kept))
  return flax.traverse_util.unflatten_dict(new)


def init_variables(config: ml_collections.ConfigDict, seed: int = 0, abstract: bool = False) -> Any:
  """The initial variables of ``config``'s model (``abstract``: shapes and dtypes only)."""
  from conddetr_jax import models  # pylint: disable=g-import-not-at-top

  return models.init_variables(
    models.build_model(config), jax.random.PRNGKey(seed), abstract=abstract
  )


def from_torch(
  path_or_state_dict: str | os.PathLike | Mapping[str, Any],
  config: ml_collections.ConfigDict,
  variables: Any = None,
) -> Any:
  """Flax variables ({'params', 'batch_stats'}) of ``config``'s model from a PyTorch-world
  checkpoint.

  Accepts the original's .pth (or a bare state dict, as a file or a dict of arrays), a torchvision
  ImageNet ResNet (backbone only; the rest comes from ``variables`` or a fresh init), or HF
  ConditionalDetr weights (.safetensors/.bin, 4.x or 5.x key names).
  A class head of another size is re-initialised when ``config.init.skip_class_head`` is set.
  """
  state, layout = to_original_layout(read_state_dict(path_or_state_dict))
  skip = bool(config.init.skip_class_head)
  allow_missing = (
    ("transformer.", "input_proj.", "query_embed.", "class_embed.", "bbox_embed.")
    if layout == "torchvision"
    else ()
  )
  # Group DETR fine-tuning from a one-group checkpoint (the original's): the extra groups start
  # fresh.
  new_groups = config.model.num_groups > 1 and GROUP_QUERY_KEY not in state
  if new_groups:
    allow_missing += (GROUP_QUERY_KEY,)
  # The dense auxiliary head is ours: a checkpoint without it (the original's) leaves it fresh.
  new_dense_head = config.model.dense_head and not any(
    k.startswith(DENSE_HEAD_PREFIXES) for k in state
  )
  if new_dense_head:
    allow_missing += DENSE_HEAD_PREFIXES
  # A backbone stopping after layer2 or layer3 starts from the ImageNet ResNet's first stages.
  num_stages = config.model.backbone_num_stages
  unused = (
    tuple(f"backbone.0.body.layer{stage}." for stage in range(num_stages + 1, 5))
    if layout == "torchvision"
    else ()
  )
  if variables is None:
    # Only tensors the checkpoint lacks need computed initial values; for a full checkpoint
    # shapes suffice, which saves compiling the model's init (~20 s for R50 on a CPU).
    class_head = state.get(CLASS_HEAD_KEYS[1])
    keeps_init = (
      layout == "torchvision"
      or new_groups
      or new_dense_head
      or (skip and class_head is not None and class_head.shape[0] != config.model.num_classes)
    )
    variables = init_variables(config, config.seed, abstract=not keeps_init)
  return load_into(
    state,
    variables,
    skip_class_head=skip,
    allow_missing_prefixes=allow_missing,
    unused_prefixes=unused,
  )


def save_variables(variables: Any, out_dir: str | os.PathLike) -> str:
  """Writes ``{'params', 'batch_stats'}`` as an Orbax checkpoint that eval.py, predict.py and
  ``config.init_from`` restore. Refuses to overwrite an existing folder."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = storage.display(out_dir)
  if storage.path(path).exists():
    raise FileExistsError(f"{path} exists; choose a new --out folder")
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(
      storage.path(path), {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    )
  return path
