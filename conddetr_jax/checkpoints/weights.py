"""A model's variables restored from any checkpoint, for eval.py, predict.py and
``config.init_from``.

Resuming a run (the whole train state) is ``training/checkpoint.py``'s job; this module reads
only the model's ``{'params', 'batch_stats'}``, from a checkpoint that is one of:
- a training workdir (its latest step), its ``checkpoints/`` folder (the latest step), or one step's
  folder (``<workdir>/checkpoints/<step>``): Orbax, as ``training/checkpoint.py`` writes it; only
  the model's variables are read, on any number of devices;
- an Orbax checkpoint holding just ``{'params', 'batch_stats'}``
  (``python -m conddetr_jax.convert``);
- a PyTorch/HF file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``): converted on the fly by
  ``convert.from_torch``.
"""

import importlib
import os
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import ml_collections
import orbax.checkpoint as ocp

from conddetr_jax import models, storage
from conddetr_jax.checkpoints import convert

CHECKPOINT_DIR = "checkpoints"  # a training workdir's folder of step checkpoints
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_VARIABLE_COLLECTIONS = ("params", "batch_stats")
_TRAIN_STATE_ITEM = (
  "state"  # the item of a step folder that training/checkpoint.py saves the state in
)
_ORBAX_METADATA = "_METADATA"  # present in every Orbax PyTree checkpoint folder
_EMA_PARAMS = "ema_params"  # the train state's moving average of the weights (config.ema_decay > 0)


def _latest_step_dir(directory: epath.Path) -> epath.Path | None:
  """The newest complete step folder of an Orbax ``CheckpointManager`` directory, or None."""
  manager = ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
  )
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  return None if step is None else directory / str(step)


def resolve_orbax_checkpoint(path: str) -> str:
  """The Orbax tree that holds the variables, from a workdir, a checkpoints folder or a step folder.

  Returns:
    A folder whose Orbax tree has ``params`` and ``batch_stats`` at its top level (possibly
    among other entries, e.g. a train state's ``opt_state``).

  Raises:
    FileNotFoundError: nothing at ``path`` or no checkpoint in it (the message says what was
      expected).
  """
  p = storage.path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if (p / CHECKPOINT_DIR).is_dir():  # a workdir
    p = p / CHECKPOINT_DIR
  if (
    not (p / _ORBAX_METADATA).exists() and not (p / _TRAIN_STATE_ITEM).exists()
  ):  # a checkpoints folder
    p = _latest_step_dir(p) or p
  if (p / _TRAIN_STATE_ITEM / _ORBAX_METADATA).exists():  # one training step
    return os.fspath(p / _TRAIN_STATE_ITEM)
  if (p / _ORBAX_METADATA).exists():  # an Orbax tree of the variables
    return os.fspath(p)
  raise FileNotFoundError(
    f"no checkpoint in {path}: expected a training workdir (with {CHECKPOINT_DIR}/<step>/), "
    f"its {CHECKPOINT_DIR}/ folder, one step folder, an Orbax checkpoint of the variables, "
    f"or a PyTorch/HF file ({', '.join(TORCH_SUFFIXES)})"
  )


MAX_LISTED_DIFFERENCES = 10


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'collection/module/.../name' -> shape of every array of ``tree``."""
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def matching_configs(shapes: dict[str, tuple[int, ...]]) -> list[str]:
  """The repository's configs (``configs.NAMES``) whose model has exactly these tensors.

  Each candidate's model is traced, not run (a few seconds each on a CPU): only worth it once a
  checkpoint has failed to fit. Configs differing only in what holds no weights (DC5's dilation)
  all match.
  """
  from conddetr_jax import configs  # pylint: disable=import-outside-toplevel  # only on this error path

  found = []
  for name in configs.NAMES:
    config = importlib.import_module(f"conddetr_jax.configs.{name}").get_config()
    abstract = models.init_variables(
      models.build_model(config), jax.random.PRNGKey(0), abstract=True
    )
    if _shapes({c: abstract[c] for c in _VARIABLE_COLLECTIONS if c in abstract}) == shapes:
      found.append(name)
  return found


def _check_fits(saved: Any, target: Any, tree: str, config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the tensors that differ between a checkpoint and the model, and the
  repository's configs the checkpoint fits, if any."""
  have = _shapes({c: saved[c] for c in _VARIABLE_COLLECTIONS if saved.get(c)})
  want = _shapes(target)
  problems = [
    f"{k}: checkpoint {have[k]}, model {want[k]}"
    for k in sorted(want.keys() & have.keys())
    if have[k] != want[k]
  ]
  problems += [f"{k}: not in the checkpoint" for k in sorted(want.keys() - have.keys())]
  problems += [f"{k}: not in the model" for k in sorted(have.keys() - want.keys())]
  if problems:
    m = config.model
    listed = problems[:MAX_LISTED_DIFFERENCES]
    if len(problems) > len(listed):
      listed.append(f"... and {len(problems) - len(listed)} more")
    fits = matching_configs(have)
    hint = (
      f"\nIt fits the model of {' and of '.join(f'configs/{name}.py' for name in fits)}."
      if fits
      else ""
    )
    raise ValueError(
      f"the checkpoint {tree} does not fit the model of this config (backbone {m.backbone}, "
      f"hidden_dim {m.hidden_dim}, {m.enc_layers}+{m.dec_layers} layers, num_queries "
      f"{m.num_queries}, num_classes {m.num_classes}); {len(problems)} tensors differ:\n  "
      + "\n  ".join(listed)
      + hint
    )


def load_variables(
  config: ml_collections.ConfigDict, path: str, sharding: jax.sharding.Sharding | None = None
) -> tuple[Any, int | None]:
  """The model's ``{'params', 'batch_stats'}`` from a checkpoint (see the module docstring); a
  model without frozen BatchNorm (``backbone_norm='group_norm'``) has no ``batch_stats``. From a
  training state that keeps a moving average of the weights (``config.ema_decay`` > 0), the
  average is read as ``params`` unless ``config.evaluation.use_ema`` is False.

  Args:
    config: the run config; its model must be the checkpoint's (same backbone, sizes, classes).
    path: the checkpoint.
    sharding: where Orbax places the arrays (e.g. replicated on the mesh); default: the first
      local device. Converted PyTorch weights are host arrays.

  Returns:
    The variables, and the training step they are from (None for other checkpoints).

  Raises:
    FileNotFoundError: nothing at ``path``, or no checkpoint there.
    ValueError: the checkpoint does not fit the config's model (the message says how).
  """
  storage.check_reachable(path, "checkpoint")
  if path.endswith(TORCH_SUFFIXES) or storage.path(path).is_file():
    if not path.endswith(TORCH_SUFFIXES):
      raise ValueError(
        f"{path} is a file but not a PyTorch/HF checkpoint ({', '.join(TORCH_SUFFIXES)}); "
        "Orbax checkpoints are folders"
      )
    return convert.from_torch(path, config), None
  tree = resolve_orbax_checkpoint(path)
  model = models.build_model(config)
  abstract = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    {k: abstract[k] for k in _VARIABLE_COLLECTIONS if k in abstract},
  )
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(tree).item_metadata.tree
    # A training state that keeps a moving average of the weights: that average is the run's model.
    # (A state without one saves ema_params as None.)
    params_key = (
      _EMA_PARAMS if saved.get(_EMA_PARAMS) is not None and config.evaluation.use_ema else "params"
    )
    _check_fits(dict(saved, params=saved[params_key]), target, tree, config)
    item = {params_key if k == "params" else k: v for k, v in target.items()}
    restore = ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    )
    restored = checkpointer.restore(tree, args=restore)
  variables = {"params" if k == params_key else k: v for k, v in restored.items()}
  logging.info(
    "Restored the model's variables from %s%s",
    tree,
    " (the moving average of the weights)" if params_key == _EMA_PARAMS else "",
  )
  p = storage.path(tree)
  return variables, int(
    p.parent.name
  ) if p.name == _TRAIN_STATE_ITEM and p.parent.name.isdigit() else None


def load_initial_weights(path: str, config: ml_collections.ConfigDict, variables: Any) -> Any:
  """``config.init_from``: the initial variables of a run from ``path``.

  A file is a PyTorch-world checkpoint (the original's .pth, a torchvision ResNet whose missing
  tensors keep ``variables``' values, HF weights); a folder is an Orbax checkpoint (a training
  workdir, one of its steps, or ``python -m conddetr_jax.convert``'s output).
  """
  if storage.path(path).is_dir():
    loaded, _ = load_variables(config, path)
    return loaded
  return convert.from_torch(path, config, variables=variables)
