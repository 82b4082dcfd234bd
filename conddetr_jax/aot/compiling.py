"""Compiling the run's train step and evaluation program for compile-only devices, and reading
the compiler's figures: memory, FLOPs, collectives, and why a program was refused."""

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import ml_collections

from conddetr_jax import sharding
from conddetr_jax.aot import batch_search, hlo
from conddetr_jax.aot import devices as devices_lib
from conddetr_jax.data import batch_spec
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.hardware import flops
from conddetr_jax.training import loop, parallel

GIB = 2**30


def gib(n: float) -> str:
  """Bytes as GiB with two decimals."""
  return f"{n / GIB:.2f}"


class GpuCompileError(RuntimeError):
  """The GPU compiler refused a program for a reason other than memory (one line: see
  ``compile_error_line``)."""


@dataclasses.dataclass
class Compiled:
  """The compiler's figures for one program, per device.

  Attributes:
    seconds: wall time of lower + compile.
    argument/output/alias/temp/code bytes: ``memory_analysis()`` fields; ``alias`` is output memory
      shared with donated arguments.
    flops: ``cost_analysis()['flops']`` of one device's share (multiply-add = 2).
    collectives: see ``hlo.collectives`` (count, bytes and bytes per element type of each kind).
    executable: the compiled program (callable where its devices are real).
  """

  seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  collectives: dict[str, dict]
  executable: Any = dataclasses.field(default=None, repr=False)

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to them + temporaries + code: what must fit in HBM at
    once."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )


class DoesNotFitError(RuntimeError):
  """The compiler refused the program: it needs more memory than the device has.

  The TPU compiler says why in one of two ways: "Used 17.52G of 15.75G hbm" (the whole program), or
  "the total memory required for HLO temporaries (17.62G) exceeds available HBM (15.75G)" (its
  temporaries alone, before the rest is counted).

  Attributes:
    needed_bytes: what the compiler said the whole program needs (else None).
    temp_bytes: what it said the temporaries alone need, when that is all it said (else None).
    capacity_bytes: the memory the compiler said it may use (a little under the chip's nominal HBM:
      15.75 GiB on a 16 GiB v5e), when its message says (else None).
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.needed_bytes = self.temp_bytes = self.capacity_bytes = None
    if m := _USED_OF.search(message):
      self.needed_bytes, self.capacity_bytes = _bytes(m[1], m[2]), _bytes(m[3], m[4])
    elif m := _TEMPORARIES_EXCEED.search(message):
      self.temp_bytes, self.capacity_bytes = _bytes(m[1], m[2]), _bytes(m[3], m[4])

  def describe_need(self) -> str:
    """' (the compiler: 17.52 GiB needed)', or '' when its message gave no figure."""
    if self.needed_bytes is not None:
      return f" (the compiler: {gib(self.needed_bytes)} GiB needed)"
    if self.temp_bytes is not None:
      return f" (the compiler: {gib(self.temp_bytes)} GiB of temporaries alone needed)"
    return ""

  def peak_estimate(self, other_bytes: float) -> float | None:
    """The program's peak by the compiler's figure: the whole program's need, or the temporaries'
    plus ``other_bytes`` (arguments, outputs, code: from a compile of the same program that
    fitted)."""
    if self.needed_bytes is not None:
      return self.needed_bytes
    return None if self.temp_bytes is None else self.temp_bytes + other_bytes


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")
_SIZE = r"([\d.]+)([KMG])"
_USED_OF = re.compile(rf"[Uu]sed\s+{_SIZE}\s+of\s+{_SIZE}")
_TEMPORARIES_EXCEED = re.compile(
  rf"temporaries\s+\({_SIZE}\)\s+exceeds\s+available\s+HBM\s+\({_SIZE}\)"
)


def _bytes(number: str, unit: str) -> float:
  return float(number) * {"K": 2**10, "M": 2**20, "G": GIB}[unit]


_INSTRUCTION = re.compile(r"%([\w.-]+) = [^=]*?\b([a-z][a-z-]*)\(")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def compile_error_line(message: str) -> str:
  """One line out of an XLA compile error (often hundreds of lines of HLO): the error's first
  sentence, the HLO instruction it names with its op (and custom-call target), and the JAX
  operation that made it (its ``op_name`` metadata, the model's module path)."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  head = lines[0] if lines else "unknown error"
  head = head if len(head) <= 240 else head[:240] + "..."
  where = []
  if m := _INSTRUCTION.search(message):
    where.append(f"instruction %{m[1]} ({m[2]})")
  if m := _CUSTOM_CALL_TARGET.search(message):
    where.append(f"custom call {m[1]}")
  if m := _OP_NAME.search(message):
    where.append(f"from JAX op {m[1]}")
  return head.split(" hlo: ")[0].rstrip(":; ") + (f" [at {'; '.join(where)}]" if where else "")


def compile_lowered(
  lower: Callable[[], Any], compiler_options: dict[str, Any] | None = None
) -> Compiled:
  """Lowers and compiles (``lower()`` returns a ``jax.stages.Lowered``) and reads its figures.

  ``compiler_options``: XLA options for this compile (e.g. ``GPU_COMPILER_OPTIONS``).

  Raises:
    DoesNotFitError: the compiler ran out of device memory for the program.
  """
  t0 = time.perf_counter()
  try:
    compiled = lower().compile(compiler_options) if compiler_options else lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA raises its runtime error type)
    if _OUT_OF_MEMORY.search(str(e)):
      raise DoesNotFitError(str(e)) from e
    raise
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return Compiled(
    seconds=seconds,
    argument_bytes=mem.argument_size_in_bytes,
    output_bytes=mem.output_size_in_bytes,
    alias_bytes=mem.alias_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes,
    code_bytes=mem.generated_code_size_in_bytes,
    flops=float(flops.cost_analysis(compiled).get("flops", 0.0)),
    collectives=hlo.collectives(compiled.as_text()),
    executable=compiled,
  )


def abstract_batch(
  fields: dict[str, batch_spec.Field], sharding: jax.sharding.Sharding
) -> dict[str, jax.ShapeDtypeStruct]:
  """``batch_spec``'s fields as shapes on ``sharding`` (int64 ids as JAX's default integer)."""
  return {
    k: jax.ShapeDtypeStruct(f.shape, jax.dtypes.canonicalize_dtype(f.dtype), sharding=sharding)
    for k, f in fields.items()
  }


def _replicated_shapes(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class SliceCompiler:
  """Compiles the run's train step and evaluation program for a mesh of (compile-only) devices."""

  def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[Any]):
    if config.parallel != "jit":
      logging.warning(
        "config.parallel=%r: compiling the jit strategy (the same train_step)", config.parallel
      )
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.parallel = "jit"
    self.config = config
    self.mesh = sharding.make_mesh(devices)
    # The schedule's steps per epoch only moves the LR drop: it changes no shape or op.
    self.model, abstract_variables, create, self.par = loop.build_train_step(
      config, 1000, self.mesh
    )
    replicated = sharding.replicated(self.mesh)
    self.replicated = replicated
    self._state = self.par.abstract_state(jax.eval_shape(create, abstract_variables))
    self.variables = _replicated_shapes(abstract_variables, replicated)
    self.gpu = devices_lib.is_gpu(devices[0])
    self._options = devices_lib.gpu_compiler_options() if self.gpu else None

  @property
  def devices(self) -> int:
    return self.mesh.size

  def train_args(self, per_device_batch: int, hw: tuple[int, int]) -> tuple[Any, Any]:
    """The train step's abstract (state, batch) for ``per_device_batch`` images of ``hw`` per
    device."""
    fields = batch_spec.train_batch(
      per_device_batch * self.devices, hw, self.config.dataset.max_boxes
    )
    return self._state, abstract_batch(fields, self.par.batch_sharding)

  def _eval_args(self, per_device_batch: int, hw: tuple[int, int]) -> tuple[Any, Any]:
    fields = batch_spec.eval_batch(per_device_batch * self.devices, hw)
    return self.variables, abstract_batch(fields, sharding.batch_sharding(self.mesh))

  def compile(self, lower: Callable[[], Any]) -> Compiled:
    """``compile_lowered`` with this target's options; a GPU compile's failure as one line."""
    try:
      return compile_lowered(lower, self._options)
    except DoesNotFitError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (XLA raises its runtime error type)
      if not self.gpu:
        raise
      raise GpuCompileError(f"the GPU compiler failed: {compile_error_line(str(e))}") from e

  def train(self, per_device_batch: int, hw: tuple[int, int]) -> Compiled:
    """The train step for ``per_device_batch`` images of ``hw`` on each device.

    Raises:
      DoesNotFitError: the compiler ran out of memory; GpuCompileError: a GPU compile failed
        otherwise.
    """
    state, batch = self.train_args(per_device_batch, hw)
    return self.compile(lambda: self.par.lower(state, batch))

  def eval(self, per_device_batch: int, hw: tuple[int, int]) -> Compiled:
    """The evaluation forward + post-processing for ``per_device_batch`` images of ``hw`` per
    device."""
    variables, batch = self._eval_args(per_device_batch, hw)
    k = coco_eval.top_k(self.config)
    return self.compile(
      lambda: coco_eval.predict_batch.lower(variables, batch, model=self.model, k=k)
    )

  def train_macs_per_image(self, per_device_batch: int, hw: tuple[int, int]) -> float:
    """Multiply-adds of one train step per image by the project's counter (``flops.macs``:
    convolutions and matrix products of the forward, backward and matcher; nothing else): traced,
    not compiled."""
    return flops.macs(self.par.step, *self.train_args(per_device_batch, hw))["total"] / (
      per_device_batch * self.devices
    )

  def eval_macs_per_image(self, per_device_batch: int, hw: tuple[int, int]) -> float:
    """``train_macs_per_image`` for the evaluation program."""
    k = coco_eval.top_k(self.config)
    predict = lambda v, b: coco_eval.predict_batch(v, b, model=self.model, k=k)
    return flops.macs(predict, *self._eval_args(per_device_batch, hw))["total"] / (
      per_device_batch * self.devices
    )


def search_max_batch(
  compiler: SliceCompiler,
  hw: tuple[int, int],
  batch: int,
  configured: Compiled | DoesNotFitError,
  capacity_gib: float,
  out: Callable[[str], None],
  limit: int = 4096,
) -> int:
  """``--max_batch``: the largest per-device train batch that fits ``capacity_gib``, printed and
  returned.

  Starts from the configured ``batch`` (already compiled: ``configured``, its program or the
  compiler's refusal), then lets ``batch_search.largest_fitting_batch`` choose the batches to
  compile (a line through the measured peaks predicts the answer; one compile confirms that it fits,
  one that the next batch does not). Prints a line per try as it ends (each is a compile of
  minutes), then the answer.
  """
  compiles = 0
  other_bytes = (
    0.0  # a fitted compile's bytes besides temporaries, for refusals that name only those
  )

  def outcome(c: Compiled | DoesNotFitError) -> batch_search.BatchTry:
    nonlocal other_bytes
    if isinstance(c, DoesNotFitError):
      return batch_search.BatchTry(False, c.peak_estimate(other_bytes), c.capacity_bytes)
    other_bytes = c.peak_bytes - c.temp_bytes
    return batch_search.BatchTry(c.peak_bytes <= capacity_gib * GIB, c.peak_bytes)

  def try_batch(n: int, why: str) -> batch_search.BatchTry:
    nonlocal compiles
    if n == batch:
      result, seconds, why = outcome(configured), "", "the configured batch, compiled above"
    else:
      compiles += 1
      t0 = time.perf_counter()
      try:
        result = outcome(compiler.train(n, hw))
      except DoesNotFitError as e:
        result = outcome(e)
      seconds = f" [compile {time.perf_counter() - t0:.0f} s]"
    if result.peak_bytes is None:
      peak = "the compiler ran out of memory"
    elif result.fits or result.capacity_bytes is None:
      peak = f"peak {gib(result.peak_bytes)} GiB"
    else:
      peak = (
        f"needs about {gib(result.peak_bytes)} GiB of the compiler's {gib(result.capacity_bytes)}"
      )
    out(
      f"    max_batch try {n}/device ({why}): {peak}: "
      f"{'fits' if result.fits else 'does not fit'}{seconds}"
    )
    return result

  best = batch_search.largest_fitting_batch(try_batch, capacity_gib * GIB, start=batch, limit=limit)
  if best == 0:
    verdict = "none (1 image per device does not fit)"
  elif best == limit:
    verdict = f"{best} (the search's cap; more may fit)"
  else:
    verdict = f"{best} ({best} fits, {best + 1} does not)"
  out(
    f"    largest per-device train batch that fits {capacity_gib:g} GiB: {verdict}; {compiles} "
    "compiles"
  )
  return best
