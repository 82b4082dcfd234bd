"""The device mesh and the two shardings every step uses: state replicated, batch split on ``data``.

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
  """The sharding of the state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of a global batch: split along its leading (batch) axis over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
