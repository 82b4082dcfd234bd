"""eval.py's library: the COCO box AP of a saved checkpoint, recorded in a workdir."""

import json
import os

import jax
import ml_collections

from conddetr_jax import data, models, sharding, storage
from conddetr_jax.checkpoints import weights
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.training import metrics as metrics_lib


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, checkpoint: str, workdir: str, split: str = "val"
) -> coco_eval.EvalResult:
  """eval.py: COCO box AP of a checkpoint on all devices (of all processes; collective).

  Writes ``workdir/detections.json`` (COCO results format) and appends ``{"step", "checkpoint",
  "split", AP, AP50, ...}`` to ``workdir/metrics.jsonl`` (process 0). ``step`` is the training step
  of an Orbax checkpoint, null for a PyTorch/HF file.

  Raises:
    FileNotFoundError: no checkpoint, or no dataset, at the given paths.
    ValueError: the checkpoint does not fit the config's model.
    data.BadImageError: an image of the split is missing or unreadable (named).
  """
  storage.check_reachable(workdir, "--workdir")
  storage.check_reachable(checkpoint, "--checkpoint")
  data.prepare_dataset(config)
  mesh = sharding.make_mesh()
  model = models.build_model(config)
  variables, step = weights.load_variables(config, checkpoint, sharding.replicated(mesh))
  result = coco_eval.run_evaluation(
    config,
    model,
    variables,
    mesh,
    split=split,
    detections_path=os.fspath(storage.path(workdir) / coco_eval.DETECTIONS_FILE),
  )
  if jax.process_index() == 0:
    record = {
      "step": step,
      "checkpoint": storage.display(checkpoint),
      "split": split,
      **result.metrics,
    }
    storage.append_text(storage.path(workdir) / metrics_lib.METRICS_FILE, json.dumps(record) + "\n")
  return result
