"""The best evaluated weights of a run (``config.keep_best``), in ``<workdir>/best/<step>``.

Rolling checkpoints keep the latest steps, so a fine-tuning run that overfits late loses its best
weights; this keeps them apart. Only the evaluated variables are written (the weights' moving
average where the run evaluates it), as ``{'params', 'batch_stats'}`` in the layout of a training
step folder: ``eval.py --checkpoint=<workdir>/best`` and ``config.init_from`` read it like any
checkpoint. The metric's value is saved beside the weights, so a resumed run only replaces them
with better ones.
"""

from typing import Any, Mapping

from absl import logging
import orbax.checkpoint as ocp

from conddetr_jax import storage
from conddetr_jax.evaluation import coco_eval

BEST_DIR = "best"
_WEIGHTS = "state"  # the item name of a training step folder, which checkpoints.weights reads
_RECORD = "meta"


def check_metric(metric: str, categories: Mapping[int, str]) -> None:
  """Fails before training when ``config.keep_best`` names no metric evaluation reports.

  Args:
    metric: ``config.keep_best``: '' (keep none), a COCO metric (``AP``, ``AP50``, ...) or a class's
      ``AP/<name>``.
    categories: the val split's category id -> name.

  Raises:
    ValueError: naming the metrics it can be.
  """
  known = coco_eval.METRIC_NAMES + tuple(coco_eval.class_metric_names(categories).values())
  if metric and metric not in known:
    classes = f", or a class's AP (e.g. {known[len(coco_eval.METRIC_NAMES)]})" if categories else ""
    raise ValueError(
      f"config.keep_best={metric!r} is not a metric evaluation reports: use '' (keep none), one "
      f"of {', '.join(coco_eval.METRIC_NAMES)}{classes}"
    )


class BestCheckpoint:
  """Keeps the weights with the highest ``metric`` so far (every AP and AR: higher is better)."""

  def __init__(self, workdir: str, metric: str):
    """Opens ``<workdir>/best`` and reads what it already holds (a resumed run).

    Args:
      workdir: the run's directory, local or ``gs://``.
      metric: the evaluation metric that ranks weights, e.g. ``"AP"``.
    """
    self.metric = metric
    self.directory = storage.path(workdir) / BEST_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_WEIGHTS, _RECORD)
    )
    self.best = self._read_record()

  def _read_record(self) -> dict[str, Any] | None:
    """``{"step", "metric", "value"}`` of the weights kept, or None (none, or by another metric)."""
    step = self._manager.latest_step()
    if step is None:
      return None
    record = self._manager.restore(
      step, args=ocp.args.Composite(**{_RECORD: ocp.args.JsonRestore()})
    )[_RECORD]
    if record["metric"] != self.metric:
      logging.warning(
        "%s holds step %d's weights, best by %s (%.4f); this run keeps the best by %s and will "
        "replace them at its next evaluation",
        self.directory,
        step,
        record["metric"],
        record["value"],
        self.metric,
      )
      return None
    return record

  def offer(self, step: int, variables: Any, metrics: Mapping[str, float]) -> bool:
    """Saves ``variables`` as step ``step`` if their ``metrics`` beat the kept ones; collective.

    Every process must call it with the same metrics (evaluation broadcasts them), so all take
    the same decision and write together.

    Args:
      step: the training step the variables are from.
      variables: the evaluated ``{'params', 'batch_stats'}`` (global arrays, split or replicated).
      metrics: the evaluation's results, holding ``self.metric``.

    Returns:
      Whether they were saved.
    """
    value = float(metrics[self.metric])
    if self.best is not None and value <= self.best["value"]:
      return False
    record = {"step": step, "metric": self.metric, "value": value}
    if step in self._manager.all_steps():  # a resumed run evaluated this step again, and better
      self._manager.delete(step)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        **{_WEIGHTS: ocp.args.StandardSave(variables), _RECORD: ocp.args.JsonSave(record)}
      ),
      force=True,
    )
    self._manager.wait_until_finished()  # the previous best is deleted only once this one is whole
    previous = (
      "" if self.best is None else f" (was {self.best['value']:.4f} at step {self.best['step']})"
    )
    logging.info(
      "best %s so far: %.4f at step %d%s, kept in %s",
      self.metric,
      value,
      step,
      previous,
      self.directory,
    )
    self.best = record
    return True

  def close(self) -> None:
    """Releases the manager's threads."""
    self._manager.close()
