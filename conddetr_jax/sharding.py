"""The device mesh and the shardings the steps use: a batch split on ``data``, arrays replicated,
and arrays split on ``data`` along one of their own axes (the train state's, ``split_over_data``).

Training and evaluation both place arrays with these; host numpy batches become global arrays
with ``data.to_global_arrays(batch, batch_sharding(mesh))``.
"""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes) with axis ``data``.

  ``jax.devices()`` lists each process's devices together, so every host's data shard is one
  contiguous block of the global batch.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (evaluation's weights; the train state's counters)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a global batch: split along its leading (batch) axis over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def split_over_data(tree: Any, mesh: Mesh) -> Any:
  """A sharding per array of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` leaves) that splits it
  over ``data`` along its longest axis whose length the axis's device count divides (the first
  such on a tie), each device holding one slice; scalars and arrays with no such axis, and every
  array on a one-device mesh, are replicated."""
  devices = mesh.shape[DATA_AXIS]

  def sharding(x: Any) -> NamedSharding:
    axes = [i for i, n in enumerate(x.shape) if n % devices == 0] if devices > 1 else []
    if not axes:
      return replicated(mesh)
    axis = max(axes, key=lambda i: x.shape[i])
    return NamedSharding(mesh, PartitionSpec(*[None] * axis, DATA_AXIS))

  return jax.tree.map(sharding, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree``'s arrays (host arrays, or global arrays on ``mesh`` of any layout) replicated on
  ``mesh``: on several processes by one compiled program for the whole tree. A ``device_put`` of
  split global arrays runs one gathering program per array, and two processes whose programs are
  in flight in different orders wait for each other forever (seen on CPU with gloo)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
