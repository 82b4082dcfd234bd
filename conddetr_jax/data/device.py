"""Host batches -> global jax.Arrays sharded over the mesh's data axis, prefetched to the
devices."""

import collections
from typing import Iterator

import jax
import numpy as np


def to_global_arrays(
  batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
  """Assembles each process's slice into global arrays.

  Args:
    batch: this process's numpy batch, leading axis B_local (its slice of the global batch).
    sharding: e.g. ``NamedSharding(mesh, PartitionSpec("data"))``: the leading axis is split over
      the mesh's data axis, the other axes replicated.
  Returns:
    dict of jax.Arrays with a leading axis of B_local * process_count (the global batch).
  """
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_device(
  iterator: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Yields the batches of ``iterator`` as global arrays, keeping ``size`` transfers in flight
  (transfers are asynchronous, so the next batches move while the current step runs)."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(to_global_arrays(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
