"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``: asynchronous and atomic.

Orbax writes each step into a temporary directory and renames it once every file (and every
host) is done, so a process killed mid-write leaves only an unfinished temporary directory:
``latest_step`` never sees it, and it is removed when the next run opens the directory.
"""

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from conddetr_jax import storage
from conddetr_jax.training.state import TrainState

_STATE = "state"
_META = "meta"
_EMA = "ema"  # the meta record's key saying whether the state keeps a moving average of the weights


class Checkpointer:
  """Saves and restores ``TrainState`` plus a small JSON record of the run's data position."""

  def __init__(self, directory: "str | os.PathLike[str]", keep: int, *, asynchronous: bool = True):
    """Opens (creating it if needed) the checkpoint directory.

    Args:
      directory: where step directories go, e.g. ``<workdir>/checkpoints``, local or ``gs://``.
      keep: how many of the latest checkpoints to keep (older ones are deleted).
      asynchronous: write in a background thread; the train loop only waits for the copy of
        the arrays to host memory.
    """
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=asynchronous,
    )
    self.directory = storage.path(storage.display(directory))
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _META)
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts writing ``state`` (global arrays, split or not) and ``meta`` (JSON) as ``step``.

    ``meta`` gains ``"ema"``: whether the state keeps a moving average of the weights.
    Returns once the arrays are copied off the devices; call ``wait`` to block until written.
    Every process must call it.
    """
    meta = dict(meta, **{_EMA: state.ema_params is not None})
    self._manager.save(
      step,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
      ),
      force=True,
    )

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Reads checkpoint ``step`` into arrays shaped and sharded like ``target``.

    Checkpoints written before the train state could keep a moving average of the weights (their
    ``meta`` has no ``"ema"``) restore into a state without one.

    Args:
      step: a step from ``latest_step``.
      target: a state of ``jax.ShapeDtypeStruct`` leaves with shardings (or concrete arrays).

    Returns:
      The restored state and the ``meta`` record saved with it.

    Raises:
      ValueError: the checkpoint keeps a moving average of the weights and ``target`` does not,
        or the other way round (a run cannot switch its average on or off midway).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    meta = self.read_meta(step)
    saved_ema, wanted_ema = bool(meta.get(_EMA, False)), abstract.ema_params is not None
    if saved_ema != wanted_ema:
      raise ValueError(
        f"checkpoint {step} in {self.directory} was written {'with' if saved_ema else 'without'} a "
        "moving average of the weights, and this run "
        f"{'keeps none' if saved_ema else 'keeps one'}: "
        f"resume with {'config.ema_decay > 0' if saved_ema else 'config.ema_decay=0'}, or start in "
        f"a new --workdir (--config.init_from={self.directory.parent} starts from its weights)"
      )
    if _EMA in meta:
      return self._restore_state(step, abstract), meta
    fields = {
      f.name: getattr(abstract, f.name)
      for f in dataclasses.fields(abstract)
      if f.name != "ema_params"
    }
    return TrainState(**self._restore_state(step, fields)), meta

  def _restore_state(self, step: int, abstract: Any) -> Any:
    """The ``state`` item of checkpoint ``step``, restored into ``abstract``'s structure."""
    return self._manager.restore(
      step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
    )[_STATE]

  def read_meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` record of checkpoint ``step`` alone, without reading the state."""
    return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[
      _META
    ]

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host only: whether all hosts agreed to stop at ``step`` after a preemption notice."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.close()
