"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``: asynchronous and atomic.

Orbax writes each step into a temporary directory and renames it once every file (and every
host) is done, so a process killed mid-write leaves only an unfinished temporary directory:
``latest_step`` never sees it, and it is removed when the next run opens the directory.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from conddetr_jax.training.state import TrainState

_STATE = "state"
_META = "meta"


class Checkpointer:
  """Saves and restores ``TrainState`` plus a small JSON record of the run's data position."""

  def __init__(self, directory: str, keep: int, *, asynchronous: bool = True):
    """Opens (creating it if needed) the checkpoint directory.

    Args:
      directory: where step directories go, e.g. ``<workdir>/checkpoints``.
      keep: how many of the latest checkpoints to keep (older ones are deleted).
      asynchronous: write in a background thread; the train loop only waits for the copy of
        the arrays to host memory.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=asynchronous)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
    """Starts writing ``state`` (replicated global arrays) and ``meta`` (JSON) as ``step``.

    Returns once the arrays are copied off the devices; call ``wait`` to block until written.
    Every process must call it.
    """
    self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                                         _META: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Reads checkpoint ``step`` into arrays shaped and sharded like ``target``.

    Args:
      step: a step from ``latest_step``.
      target: a state of ``jax.ShapeDtypeStruct`` leaves with shardings (or concrete arrays).

    Returns:
      The restored state and the ``meta`` record saved with it.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract),
                                                                       _META: ocp.args.JsonRestore()}))
    return restored[_STATE], restored[_META]

  def read_meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` record of checkpoint ``step`` alone, without reading the state."""
    return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """Multi-host only: whether all hosts agreed to stop at ``step`` after a preemption notice."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.close()
