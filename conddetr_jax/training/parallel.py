"""Data parallelism: the train step compiled on the ``data`` axis of the mesh, by jit or pmap.

Two ways to run the same ``train_step`` (``config.parallel``):
- ``jit`` (default): the global batch is one ``jax.Array`` sharded over ``data``, and ``jax.jit``
  with in/out shardings lets XLA partition the step. With ``config.shard_state`` (default) the
  parameters, the AdamW moments and their moving average are split over ``data`` as well
  (``train_state_sharding``; fully sharded data parallelism, ZeRO stage 3): each device keeps and
  updates its slice of them from the summed gradients, and XLA gathers the weights (in the
  compute dtype) where the forward and backward passes use them. On N devices that is 1/N of the
  optimiser's work, memory traffic and state per device, for gathering the weights twice a step
  (docs/accelerators.md, "Seventh round"). Otherwise the state is replicated. Works unchanged on
  one device, one host or many hosts.
- ``pmap``: each local device gets its slice of the batch and a copy of the state; the step adds
  ``axis_name='data'`` so gradients and metrics are ``pmean``-ed.
Both take this process's numpy slice of the global batch (``host_batch``, then
``data.to_global_arrays`` with ``batch_sharding``) and hand back states of global arrays laid out
as ``state_sharding`` says (``host_state``), which checkpoints save as they are and evaluation
gathers. The mesh and its shardings are ``conddetr_jax.sharding``'s, which evaluation shares.
"""

import functools
from typing import Any, Callable

import flax.jax_utils
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from conddetr_jax.hardware import flops
from conddetr_jax.sharding import DATA_AXIS, batch_sharding, replicated, split_over_data
from conddetr_jax.training.state import TrainState

PARALLEL_MODES = ("jit", "pmap")

StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


class _Parallel:
  """What both strategies share: ``self._step``, the step jitted or pmapped for their layout."""

  _step: Any
  # How ``device_state`` takes and ``host_state`` gives a state: one sharding, or a state of them.
  state_sharding: Any

  def abstract_state(self, shapes: TrainState) -> TrainState:
    """``shapes`` (a train state of ``jax.ShapeDtypeStruct`` leaves) laid out as ``host_state``
    gives states: what a checkpoint restores into and the AOT compiler compiles for."""
    layout = self.state_sharding
    if isinstance(layout, jax.sharding.Sharding):
      layout = jax.tree.map(lambda _: layout, shapes)
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, layout
    )

  def step(
    self, state: TrainState, batch: dict[str, jax.Array]
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update; ``state`` is donated. Metrics are replicated scalars under jit and have a
    leading local-device axis under pmap (``local`` takes it off)."""
    return self._step(state, batch)

  def compile(self, state: TrainState, batch: dict[str, jax.Array]) -> float | None:
    """Compiles the step for the shapes of ``state`` and ``batch`` without running it; returns its
    FLOPs per device (XLA's ``cost_analysis``), or None where the backend counts none.

    The next ``step`` on those shapes runs the program compiled here: JAX keeps it with the
    jitted function (pmap's too, a jit of a shard_map). Calling the compiled object instead would
    not work for pmap on several processes, which JAX's ``lower`` leaves to global shapes.
    """
    counted = flops.cost_analysis(self._step.lower(state, batch).compile()).get("flops")
    return float(counted) if counted and counted > 0 else None


def splits_state(config: ml_collections.ConfigDict) -> bool:
  """Whether a run keeps its train state split over the devices: ``config.shard_state`` under the
  jit strategy (pmap keeps a whole copy on each device)."""
  return config.shard_state and config.parallel == "jit"


def train_state_sharding(abstract_state: TrainState, mesh: Mesh, shard: bool) -> TrainState:
  """The jit strategy's layout of a train state (of arrays or ``jax.ShapeDtypeStruct`` leaves):
  with ``shard`` (``config.shard_state``) its parameters, optimiser state and moving average split
  over ``data`` (``sharding.split_over_data``: each along its longest axis the device count
  divides) and the rest (counters, key, frozen BatchNorm statistics) replicated; without, all
  replicated."""
  layout = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  if not shard:
    return layout
  return layout.replace(
    params=split_over_data(abstract_state.params, mesh),
    opt_state=split_over_data(abstract_state.opt_state, mesh),
    ema_params=split_over_data(abstract_state.ema_params, mesh),
  )


class JitParallel(_Parallel):
  """``jax.jit`` of the step over a sharded global batch; the state laid out as
  ``state_sharding``."""

  def __init__(self, step_fn: StepFn, mesh: Mesh, state_sharding: Any = None):
    """step_fn(state, batch) -> (state, metrics), without ``axis_name``; ``state_sharding``: a
    train state of shardings (``train_state_sharding``), or None for a replicated state."""
    self.mesh = mesh
    self.state_sharding = replicated(mesh) if state_sharding is None else state_sharding
    self.batch_sharding = batch_sharding(mesh)
    self._step = jax.jit(
      step_fn,
      in_shardings=(self.state_sharding, self.batch_sharding),
      out_shardings=(self.state_sharding, replicated(mesh)),
      donate_argnums=0,
    )

  def device_state(self, host_state: TrainState) -> TrainState:
    """The step's layout of a state given as global arrays of any layout (or host arrays)."""
    return jax.device_put(host_state, self.state_sharding)

  def host_state(self, state: TrainState) -> TrainState:
    """The state as global arrays (already so under jit, split or replicated as the step keeps
    them)."""
    return state

  def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice (B_local, ...), as ``batch_sharding`` assembles it into the global
    batch."""
    return batch

  def lower(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
    """The step lowered for these shapes, e.g. to read its compiled memory use."""
    return self._step.lower(state, batch)

  def local(self, tree: Any) -> Any:
    """A step output (metrics, a state field) without the per-device axis: unchanged under jit."""
    return tree


class PmapParallel(_Parallel):
  """``jax.pmap`` of the step over this process's devices, collectives over all processes."""

  def __init__(self, step_fn: StepFn, mesh: Mesh):
    """step_fn(state, batch, axis_name=...) -> (state, metrics)."""
    self.mesh = mesh
    # The layout of the states that go in and come out (``device_state``, ``host_state``).
    self.state_sharding = replicated(mesh)
    self._local_devices = jax.local_devices()
    # pmap takes per-process arrays whose leading axis is the local devices.
    self.batch_sharding = NamedSharding(
      Mesh(np.asarray(self._local_devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS)
    )
    self._step = jax.pmap(
      functools.partial(step_fn, axis_name=DATA_AXIS), axis_name=DATA_AXIS, donate_argnums=0
    )

  def device_state(self, host_state: TrainState) -> TrainState:
    """One copy of the state per local device (leading axis = local devices)."""
    return flax.jax_utils.replicate(jax.device_get(host_state), self._local_devices)

  def host_state(self, state: TrainState) -> TrainState:
    """The first device's copy, replicated on the mesh like the jit path's state (every process
    holds the same values, so each supplies the whole array)."""
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.state_sharding, np.asarray(x)),
      jax.device_get(flax.jax_utils.unreplicate(state)),
    )

  def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice (B_local, ...) -> (local devices, B_local / local devices, ...)."""
    n = len(self._local_devices)
    return {k: np.reshape(v, (n, -1) + np.shape(v)[1:]) for k, v in batch.items()}

  def local(self, tree: Any) -> Any:
    """A step output (metrics, a state field) without the per-device axis: the first device's
    copy, identical on every device after ``pmean``."""
    return jax.tree.map(lambda x: x[0], tree)


def make_parallel(
  mode: str, step_fn: StepFn, mesh: Mesh, state_sharding: Any = None
) -> JitParallel | PmapParallel:
  """The strategy named by ``config.parallel``; ``state_sharding`` is the jit strategy's (pmap
  keeps a copy of the state per device)."""
  if mode == "jit":
    return JitParallel(step_fn, mesh, state_sharding)
  if mode == "pmap":
    return PmapParallel(step_fn, mesh)
  raise ValueError(f"config.parallel={mode!r}: expected one of {PARALLEL_MODES}")
