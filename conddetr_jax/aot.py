"""Will it fit? Compiles the train step and the evaluation program for a TPU slice or GPU node, on any machine.

  python -m conddetr_jax.aot --config=configs/r50.py --topology=v5e:2x2 [--size=800x1216 ...]
      [--config.model.dtype=bfloat16] [--config.per_device_batch_size=N] [--max_batch] [--noeval]
  python -m conddetr_jax.aot --config=configs/r50.py --topology=h100:8   # or h200, a100-80g, a100-40g,
      # v100-16g, v100-32g; gpu:N (N H100s); h100:2x8 (2 hosts of 8)

Needs the TPU compiler (``pip install "jax[tpu]==<installed jax version>"``) or the GPU compiler
(requirements-gpu-compiler.txt, installed into a folder of its own named by
``$CONDDETR_GPU_COMPILER_PATH``), no TPU or GPU. The train step
is the one ``train.py`` runs (``training.loop.build_train_step``: the ``jit`` strategy, the state
replicated and the batch split over a ``data`` mesh axis of all the slice's devices); evaluation is
``evaluation.predict_batch`` (forward + post-processing) at ``eval_per_device_batch_size``. For each
size it prints the compiler's own figures: compile seconds, per-device memory against the chip's
HBM, FLOPs per image (XLA's convention: a multiply-add is 2 FLOPs; elementwise ops count too), the
collectives of the compiled program, and an ESTIMATE of images/s per chip at 100% and 40% of the
chip's bf16 peak (an estimate from FLOPs, never a measurement). The last line is one summary for
scripts (see ``summary_line``). The GPU compiler gives no cost analysis: for a GPU the FLOPs are the
project's counter (``flops.py``: 2 x the multiply-adds of convolutions and matrix products only).
"""

import dataclasses
import importlib.util
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

if __name__ == "__main__":  # run as a command: quiet TensorFlow's and XLA's C++ logs before they load
  from conddetr_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_native_logs()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from conddetr_jax import batch_search, data, evaluation, flops, gpu_targets, hlo, sharding
from conddetr_jax.data import batching
from conddetr_jax.training import loop

GIB = 2**30
# The original's largest training input (shorter side 800, longer side at most 1333: 800x1216 for
# the common 3:2 images before rounding up to the bucket multiple).
ORIGINAL_LARGEST_SIZE = (800, 1216)


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation or GPU: ``name`` as in topology names, HBM per chip, dense bf16 peak per chip
  (None: no bf16 tensor cores, as on a V100)."""
  name: str
  hbm_gib: float
  bf16_tflops: float | None


# device_kind -> chip; public figures per chip (Cloud TPU documentation).
CHIPS = {
    "TPU v4": Chip("v4", 32, 275),
    "TPU v5 lite": Chip("v5e", 16, 197),
    "TPU v5e": Chip("v5e", 16, 197),
    "TPU v5": Chip("v5p", 95, 459),
    "TPU v5p": Chip("v5p", 95, 459),
    "TPU v6 lite": Chip("v6e", 32, 918),
    "TPU v6e": Chip("v6e", 32, 918),
}

class CompilerMissingError(RuntimeError):
  """The compiler for the named topology is not installed (the message says how to install it)."""


class LibtpuMissingError(CompilerMissingError):
  """The TPU compiler (the ``libtpu`` wheel) is not installed."""


class GpuCompileError(RuntimeError):
  """The GPU compiler refused a program for a reason other than memory (one line: see ``compile_error_line``)."""


# Where .ci/run and the README install the GPU compiler: a folder of its own, kept off the test
# environment's path (a CUDA plugin on it would make every JAX process look for a GPU).
GPU_COMPILER_PATH_VAR = "CONDDETR_GPU_COMPILER_PATH"
# The GPU compiler's JAX plugin (jax-cuda12-pjrt): CUDA 12, because CUDA 13's ptxas no longer
# compiles for compute capability 7.0 (the V100).
_GPU_PLUGIN = "jax_plugins.xla_cuda12"
# Compile options for every GPU program. Without a GPU there is no autotuning, and XLA's Triton GEMM
# emitter must then pick tile sizes by its heuristics, which fail for some of the model's matrix
# products ("Couldn't find output tile sizes that satisfy hlo: %dot ... out_proj"); with it off, every
# dot is a cuBLAS call, as XLA also falls back to when autotuning finds no better Triton tiling.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def install_command() -> str:
  """The pip command that installs the TPU compiler matching the installed jax."""
  return f'pip install "jax[tpu]=={jax.__version__}"'


def _quiet_libtpu() -> None:
  """Keeps libtpu's start-up warnings off the screen, and lets several compiles run at once.

  On a machine without a TPU, libtpu asks the (absent) cloud metadata for the accelerator type and
  worker host names and prints warnings (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) when it finds
  none. Compile-only topologies ignore both, so harmless values silence it; values already set (on a
  real TPU VM) are kept. The JAX default backend stays the CPU, so nothing tries to open a TPU.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
  # libtpu locks /tmp/libtpu_lockfile for one process per machine (one per TPU, on a TPU VM); with
  # compile-only devices there is nothing to share, and two compiles may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str) -> list[Any]:
  """The compile-only devices of TPU slice ``name`` (e.g. ``v5e:2x2``), obtained without a TPU.

  Raises:
    LibtpuMissingError: libtpu is not installed (the message holds the pip command).
    ValueError: naming the topology, if libtpu does not know it.
  """
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise LibtpuMissingError(f"compiling for a TPU slice needs the TPU compiler (libtpu), which is not installed. "
                             f"Install it with: {install_command()}   (no TPU needed)")
  _quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise LibtpuMissingError(f"JAX found no TPU compiler: {e}. Install it with: {install_command()}") from e
    if "INVALID_ARGUMENT" not in str(e) and "NOT_FOUND" not in str(e):
      raise
    raise ValueError(f"--topology={name!r} is not a TPU slice libtpu knows (e.g. v5e:2x2, v5p:2x2x1, "
                     f"v4:2x2x2, v6e:2x2): {e}") from e


def gpu_install_command() -> str:
  """The commands that install the GPU compiler into a folder of its own and point the tool at it."""
  return (f"pip install --target ~/conddetr-gpu-compiler -r requirements-gpu-compiler.txt && "
          f"export {GPU_COMPILER_PATH_VAR}=~/conddetr-gpu-compiler")


def gpu_compiler_options() -> dict[str, Any]:
  """``GPU_COMPILER_OPTIONS``, and the CUDA folder of the installed nvidia-cuda-nvcc-cu12 wheel (its
  ptxas and libdevice). XLA would otherwise take the first ptxas it finds on the PATH or in
  /usr/local/cuda, which may be another CUDA's: CUDA 13's refuses to compile for a V100."""
  options = dict(GPU_COMPILER_OPTIONS)
  try:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  except ModuleNotFoundError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    options["xla_gpu_cuda_data_dir"] = list(spec.submodule_search_locations)[0]
  return options


def gpu_compiler_importable() -> bool:
  """Whether this process can import the GPU compiler's JAX plugin (without importing it)."""
  try:
    return importlib.util.find_spec(_GPU_PLUGIN) is not None
  except ModuleNotFoundError:  # not even the plugins' namespace package is installed
    return False


def gpu_devices(topology: gpu_targets.GpuTopology) -> list[Any]:
  """Compile-only devices of ``topology`` (e.g. 8 H100s), obtained without a GPU.

  Must run before JAX has started its backends in this process: JAX looks for plugins once.

  Raises:
    CompilerMissingError: the GPU compiler is neither importable nor in ``$CONDDETR_GPU_COMPILER_PATH``.
  """
  folder = os.environ.get(GPU_COMPILER_PATH_VAR)
  if folder and os.path.isdir(folder) and folder not in sys.path:
    sys.path.append(folder)
  if not gpu_compiler_importable():
    raise CompilerMissingError("compiling for a GPU needs the GPU compiler (jax-cuda12-pjrt), which is not installed"
                               f"{f' in {GPU_COMPILER_PATH_VAR}={folder}' if folder else ''}. Install it with: "
                               f"{gpu_install_command()}   (no GPU needed)")
  # The plugin checks the CUDA runtime libraries' versions when it loads: none are installed (none
  # are needed to compile), and the host side runs on the CPU.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=topology.gpu.target_config(),
                                        topology=topology.topology_string)
  except NotImplementedError as e:  # JAX registered its plugins before the folder was on the path
    raise CompilerMissingError(f"JAX started without the GPU compiler ({e}): put {folder or 'its folder'} on "
                               "PYTHONPATH before JAX starts") from e
  return list(desc.devices)


def devices_of(name: str) -> list[Any]:
  """The compile-only devices of a GPU node (``h100:8``, ``gpu:4``, ``h100:2x8``) or TPU slice (``v5e:2x2``)."""
  gpu = gpu_targets.parse_topology(name)
  return topology_devices(name) if gpu is None else gpu_devices(gpu)


def is_gpu(device: Any) -> bool:
  """Whether ``device`` (compile-only or real) is an NVIDIA GPU."""
  return device.platform in ("gpu", "cuda")


def chip_of(device: Any) -> Chip | None:
  """The chip's figures for a device, or None for a device kind not in ``CHIPS`` nor ``gpu_targets.GPUS``."""
  gpu = gpu_targets.by_device_kind(device.device_kind)
  if gpu is not None:
    return Chip(gpu.name, gpu.memory_gib, gpu.bf16_tflops)
  return CHIPS.get(device.device_kind)


def devices_per_chip(devices: Sequence[Any]) -> int:
  """JAX devices per physical chip (2 where each TensorCore is a device, as on v4 without megacore)."""
  coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
  return max(1, len(devices) // len(coords)) if coords else 1


# ---- compiling -----------------------------------------------------------------------------

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
    """Arguments + outputs not aliased to them + temporaries + code: what must fit in HBM at once."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def cost_analysis(compiled: Any) -> dict[str, float]:
  """``compiled.cost_analysis()`` as one dict (per device for a partitioned program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return cost or {}


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
      return f" (the compiler: {_gib(self.needed_bytes)} GiB needed)"
    if self.temp_bytes is not None:
      return f" (the compiler: {_gib(self.temp_bytes)} GiB of temporaries alone needed)"
    return ""

  def peak_estimate(self, other_bytes: float) -> float | None:
    """The program's peak by the compiler's figure: the whole program's need, or the temporaries'
    plus ``other_bytes`` (arguments, outputs, code: from a compile of the same program that fitted)."""
    if self.needed_bytes is not None:
      return self.needed_bytes
    return None if self.temp_bytes is None else self.temp_bytes + other_bytes


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")
_SIZE = r"([\d.]+)([KMG])"
_USED_OF = re.compile(rf"[Uu]sed\s+{_SIZE}\s+of\s+{_SIZE}")
_TEMPORARIES_EXCEED = re.compile(rf"temporaries\s+\({_SIZE}\)\s+exceeds\s+available\s+HBM\s+\({_SIZE}\)")


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


def compile_lowered(lower: Callable[[], Any], compiler_options: dict[str, Any] | None = None) -> Compiled:
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
  return Compiled(seconds=seconds, argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                  alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                  code_bytes=mem.generated_code_size_in_bytes, flops=float(cost_analysis(compiled).get("flops", 0.0)),
                  collectives=hlo.collectives(compiled.as_text()), executable=compiled)


def abstract_train_batch(config: ml_collections.ConfigDict, batch_size: int, hw: tuple[int, int],
                         sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The train pipeline's batch (DESIGN.md section 2) as shapes: ``batch_size`` images of ``hw``."""
  h, w = hw
  m = config.dataset.max_boxes
  shapes = {"image": ((batch_size, h, w, 3), np.float32), "pad_mask": ((batch_size, h, w), np.bool_),
            "boxes": ((batch_size, m, 4), np.float32), "labels": ((batch_size, m), np.int32),
            "box_valid": ((batch_size, m), np.bool_), "image_id": ((batch_size,), np.int64),
            "orig_size": ((batch_size, 2), np.int32), "size": ((batch_size, 2), np.int32),
            "valid": ((batch_size,), np.bool_)}
  return {k: jax.ShapeDtypeStruct(s, jax.dtypes.canonicalize_dtype(d), sharding=sharding) for k, (s, d) in shapes.items()}


def abstract_eval_batch(batch_size: int, hw: tuple[int, int],
                        sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """What ``evaluation.gather_detections`` hands ``predict_batch``, as shapes."""
  h, w = hw
  shapes = {"image": ((batch_size, h, w, 3), np.float32), "pad_mask": ((batch_size, h, w), np.bool_),
            "orig_size": ((batch_size, 2), np.int32), "valid": ((batch_size,), np.bool_),
            "image_id": ((batch_size,), np.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def _replicated_shapes(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class SliceCompiler:
  """Compiles the run's train step and evaluation program for a mesh of (compile-only) devices."""

  def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[Any]):
    if config.parallel != "jit":
      logging.warning("config.parallel=%r: compiling the jit strategy (the same train_step)", config.parallel)
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.parallel = "jit"
    self.config = config
    self.mesh = sharding.make_mesh(devices)
    # The schedule's steps per epoch only moves the LR drop: it changes no shape or op.
    self.model, abstract_variables, create, self.par = loop.build_train_step(config, 1000, self.mesh)
    replicated = sharding.replicated(self.mesh)
    self._state = _replicated_shapes(jax.eval_shape(create, abstract_variables), replicated)
    self._variables = _replicated_shapes(abstract_variables, replicated)
    self.gpu = is_gpu(devices[0])
    self._options = gpu_compiler_options() if self.gpu else None

  @property
  def devices(self) -> int:
    return self.mesh.size

  def _train_args(self, per_device_batch: int, hw: tuple[int, int]) -> tuple[Any, Any]:
    return self._state, abstract_train_batch(self.config, per_device_batch * self.devices, hw, self.par.batch_sharding)

  def _eval_args(self, per_device_batch: int, hw: tuple[int, int]) -> tuple[Any, Any]:
    return self._variables, abstract_eval_batch(per_device_batch * self.devices, hw, sharding.batch_sharding(self.mesh))

  def _compile(self, lower: Callable[[], Any]) -> Compiled:
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
      DoesNotFitError: the compiler ran out of memory; GpuCompileError: a GPU compile failed otherwise.
    """
    state, batch = self._train_args(per_device_batch, hw)
    return self._compile(lambda: self.par.lower(state, batch))

  def eval(self, per_device_batch: int, hw: tuple[int, int]) -> Compiled:
    """The evaluation forward + post-processing for ``per_device_batch`` images of ``hw`` per device."""
    variables, batch = self._eval_args(per_device_batch, hw)
    k = evaluation.top_k(self.config)
    return self._compile(lambda: evaluation.predict_batch.lower(variables, batch, model=self.model, k=k))

  def train_macs_per_image(self, per_device_batch: int, hw: tuple[int, int]) -> float:
    """Multiply-adds of one train step per image by the project's counter (``flops.macs``: convolutions
    and matrix products of the forward, backward and matcher; nothing else): traced, not compiled."""
    return flops.macs(self.par.step, *self._train_args(per_device_batch, hw))["total"] / (per_device_batch * self.devices)

  def eval_macs_per_image(self, per_device_batch: int, hw: tuple[int, int]) -> float:
    """``train_macs_per_image`` for the evaluation program."""
    k = evaluation.top_k(self.config)
    predict = lambda v, b: evaluation.predict_batch(v, b, model=self.model, k=k)
    return flops.macs(predict, *self._eval_args(per_device_batch, hw))["total"] / (per_device_batch * self.devices)


def search_max_batch(compiler: SliceCompiler, hw: tuple[int, int], batch: int, configured: Compiled | DoesNotFitError,
                     capacity_gib: float, out: Callable[[str], None], limit: int = 4096) -> int:
  """``--max_batch``: the largest per-device train batch that fits ``capacity_gib``, printed and returned.

  Starts from the configured ``batch`` (already compiled: ``configured``, its program or the compiler's
  refusal), then lets ``batch_search.largest_fitting_batch`` choose the batches to compile (a line
  through the measured peaks predicts the answer; one compile confirms that it fits, one that the next
  batch does not). Prints a line per try as it ends (each is a compile of minutes), then the answer.
  """
  compiles = 0
  other_bytes = 0.0  # a fitted compile's bytes besides temporaries, for refusals that name only those

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
      peak = f"peak {_gib(result.peak_bytes)} GiB"
    else:
      peak = f"needs about {_gib(result.peak_bytes)} GiB of the compiler's {_gib(result.capacity_bytes)}"
    out(f"    max_batch try {n}/device ({why}): {peak}: {'fits' if result.fits else 'does not fit'}{seconds}")
    return result

  best = batch_search.largest_fitting_batch(try_batch, capacity_gib * GIB, start=batch, limit=limit)
  if best == 0:
    verdict = "none (1 image per device does not fit)"
  elif best == limit:
    verdict = f"{best} (the search's cap; more may fit)"
  else:
    verdict = f"{best} ({best} fits, {best + 1} does not)"
  out(f"    largest per-device train batch that fits {capacity_gib:g} GiB: {verdict}; {compiles} compiles")
  return best


# ---- reporting -----------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
  """'800x1216' -> (800, 1216); ValueError naming the flag otherwise."""
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if m is None or int(m[1]) < 1 or int(m[2]) < 1:
    raise ValueError(f"--size={text!r}: expected HxW, e.g. 800x1216")
  return int(m[1]), int(m[2])


def _names_dataset(config: ml_collections.ConfigDict) -> bool:
  ds = config.dataset
  return bool(ds.buckets) or ds.source in ("synthetic", "tfds") or bool(ds.root) or bool(ds.train_ann)


def default_sizes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """The config's size buckets when it names a dataset (explicit ``dataset.buckets`` or the data's
  own), else the original's largest training size rounded up to ``size_divisibility``."""
  if _names_dataset(config):
    if not config.dataset.buckets:
      data.prepare_dataset(config)
    return [tuple(int(v) for v in b) for b in data.buckets(config)]
  return [tuple(int(v) for v in batching.round_up(np.array(ORIGINAL_LARGEST_SIZE), config.dataset.size_divisibility))]


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def estimated_images_per_s(chip: Chip | None, flops_per_image: float, utilization: float) -> float | None:
  """ESTIMATE: images/s per chip if the step's FLOPs ran at ``utilization`` of the bf16 peak."""
  if chip is None or chip.bf16_tflops is None or flops_per_image <= 0:
    return None
  return chip.bf16_tflops * 1e12 * utilization / flops_per_image


def describe(c: Compiled, capacity_gib: float | None, what: str) -> list[str]:
  """Table rows for one compiled program."""
  fits = "unknown (chip capacity unknown)" if capacity_gib is None else (
      "yes" if c.peak_bytes <= capacity_gib * GIB else "NO")
  cap = "unknown" if capacity_gib is None else f"{capacity_gib:g}"
  rows = [f"  {what}: compile {c.seconds:.1f} s; per device: arguments {_gib(c.argument_bytes)} GiB, temporaries "
          f"{_gib(c.temp_bytes)} GiB, outputs {_gib(c.output_bytes)} GiB (aliased to arguments "
          f"{_gib(c.alias_bytes)}), code {_gib(c.code_bytes)}; peak {_gib(c.peak_bytes)} GiB of {cap} GiB: fits {fits}"]
  if c.collectives:
    parts = [f"{op} x{v['count']} {v['bytes'] / 2**20:.1f} MiB ("
             + ", ".join(f"{t} {b / 2**20:.1f}" for t, b in sorted(v["bytes_by_dtype"].items(), key=lambda kv: -kv[1]))
             + ")" for op, v in sorted(c.collectives.items())]
    rows.append(f"    collectives per device (static count, result bytes by element type): {', '.join(parts)}")
  else:
    rows.append("    collectives: none")
  return rows


def summary_line(topology: str, devices: int, fits: bool, peak_gib: float, capacity_gib: float | None,
                 train_gflop_per_image: float, eval_gmac_per_image: float | None) -> str:
  """``aot topology=... devices=... fits=... hbm_gib=... hbm_capacity_gib=... train_gflop_per_image=...
  eval_gmac_per_image=...`` ('unknown' where a figure is)."""
  cap = "unknown" if capacity_gib is None else f"{capacity_gib:g}"
  ev = "skipped" if eval_gmac_per_image is None else f"{eval_gmac_per_image:.1f}"
  return (f"aot topology={topology} devices={devices} fits={'yes' if fits else 'no'} hbm_gib={peak_gib:.2f} "
          f"hbm_capacity_gib={cap} train_gflop_per_image={train_gflop_per_image:.1f} eval_gmac_per_image={ev}")


def run(config: ml_collections.ConfigDict, topology: str, sizes: Sequence[tuple[int, int]], *,
        max_batch: bool = False, with_eval: bool = True, out: Callable[[str], None] = print) -> str:
  """Compiles and reports for each size; returns the summary line (of the first size), also printed last.

  Raises:
    CompilerMissingError, ValueError: no TPU or GPU compiler, an unknown topology, or a bad config.
    GpuCompileError: a GPU compile failed for a reason other than memory.
  """
  devices = devices_of(topology)
  chip = chip_of(devices[0])
  per_chip = devices_per_chip(devices)
  capacity = None if chip is None else chip.hbm_gib / per_chip
  processes = len({d.process_index for d in devices})
  # The question asked is whether per_device_batch_size images per device fit, whatever global batch
  # a training run of the config keeps (training/batch.py accumulates micro-batches of at most that
  # many): the step is compiled for exactly that many, without accumulation, which adds only one
  # gradient-sized buffer.
  config = config.copy_and_resolve_references()
  config.global_batch_size, config.grad_accum_steps = 0, 1
  loop.validate_config(config, len(devices))
  batch = config.per_device_batch_size
  m = config.model
  out(f"topology {topology}: {len(devices)} devices ({devices[0].device_kind}, {per_chip} per chip) over "
      f"{processes} host(s); chip: " + ("unknown to this tool: HBM capacity and peak not known" if chip is None else
                                       f"{chip.name}, {chip.hbm_gib:g} GiB HBM, " + (
                                           "no bf16 tensor cores" if chip.bf16_tflops is None else
                                           f"{chip.bf16_tflops:g} bf16 TFLOP/s")))
  out(f"model {m.backbone}{' DC5' if m.dilation else ''} dtype={m.dtype}; train: {batch} images per device "
      f"(global {batch * len(devices)}), state replicated, batch split over 'data'; eval: "
      f"{config.eval_per_device_batch_size} images per device")
  compiler = SliceCompiler(config, devices)
  if compiler.gpu:
    out("FLOPs are the project's counter (conddetr_jax/flops.py: 2 x the multiply-adds of convolutions and matrix "
        "products only; the GPU compiler gives no cost analysis); GMAC = GFLOP / 2.")
    out("Memory is XLA's buffer assignment without a GPU, so without autotuning: every matrix product a cuBLAS call "
        "(xla_gpu_enable_triton_gemm=false) and cuDNN convolutions without scratch space; a GPU's autotuned program "
        "may choose Triton fusions and convolution algorithms with workspace. JAX itself takes 75% of a GPU's memory "
        "unless XLA_PYTHON_CLIENT_MEM_FRACTION says more.")
  else:
    out("FLOPs are XLA's (a multiply-add counts 2; elementwise ops count too); GMAC = GFLOP / 2.")
  summary = None
  for hw in sizes:
    out(f"size {hw[0]}x{hw[1]}:")
    refusal = None
    try:
      train = compiler.train(batch, hw)
    except DoesNotFitError as e:
      train, refusal = None, e
      out(f"  train step ({batch}/device): does NOT fit{e.describe_need()}: {str(e).splitlines()[0][:300]}")
    except Exception as e:  # pylint: disable=broad-except
      if processes > 1:
        raise RuntimeError(f"--topology={topology} spans {processes} hosts and JAX could not compile it from one "
                           f"process ({type(e).__name__}: {e}); try one host, such as v5e:2x2 or h100:8") from e
      raise
    gflop = float("nan")
    if train is not None:
      out("\n".join(describe(train, capacity, f"train step ({batch}/device)")))
      flops_per_image = 2 * compiler.train_macs_per_image(batch, hw) if compiler.gpu else train.flops / batch
      gflop = flops_per_image / 1e9
      est = [estimated_images_per_s(chip, flops_per_image, u) for u in (1.0, 0.4)]
      out(f"    train: {gflop:.1f} GFLOP per image per step"
          + ("" if est[0] is None else f"; ESTIMATE (not a measurement) {est[0]:.1f} images/s per "
             f"chip at 100% of bf16 peak, {est[1]:.1f} at 40%"))
    gmac = None
    if with_eval:
      ev = compiler.eval(config.eval_per_device_batch_size, hw)
      out("\n".join(describe(ev, capacity, f"eval forward+postprocess ({config.eval_per_device_batch_size}/device)")))
      gmac = (compiler.eval_macs_per_image(config.eval_per_device_batch_size, hw) if compiler.gpu
              else ev.flops / 2 / config.eval_per_device_batch_size) / 1e9
      out(f"    eval: {gmac:.1f} GMAC ({2 * gmac:.1f} GFLOP) per image")
    if max_batch and capacity is not None:
      search_max_batch(compiler, hw, batch, train or refusal, capacity, out)
    elif max_batch:
      out("    max_batch: skipped, the chip's capacity is unknown")
    if summary is None:
      fits_train = train is not None and capacity is not None and train.peak_bytes <= capacity * GIB
      peak_bytes = train.peak_bytes if train is not None else (refusal.needed_bytes or float("nan"))
      summary = summary_line(topology, len(devices), fits_train, peak_bytes / GIB, capacity, gflop, gmac)
  out(summary)
  return summary


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program, so importing defines none)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/r50.py.",
                                                lock_config=True),
      "topology": flags.DEFINE_string("topology", "v5e:2x2", "TPU slice, e.g. v5e:2x2, v5p:2x2x1, v4:2x2x2, v6e:2x2; "
                                      "or GPU node: <gpu>:<count> or <gpu>:<hosts>x<count>, <gpu> one of "
                                      + ", ".join(gpu_targets.GPUS) + " or gpu (= h100), e.g. h100:8, h100:2x8."),
      "size": flags.DEFINE_multi_string(
          "size", None, "HxW of the padded batch (repeatable). Default: the config's size buckets when it names a "
          "dataset, else the original's largest training size rounded up as the buckets are."),
      "max_batch": flags.DEFINE_bool("max_batch", False, "Also search the largest per-device batch that fits "
                                     "(one compile per try: a line through the measured peaks predicts it, compiles confirm it; "
                                     "doubling and bisection where the peaks are not affine)."),
      "eval": flags.DEFINE_bool("eval", True, "Also compile the evaluation program (forward + post-processing)."),
  }


def main(argv: list[str], holders: dict[str, Any]) -> None:
  """Flags -> ``run``; a missing compiler, a failed GPU compile or bad input exits with a one-line error."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = holders["config"].value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/r50.py")
  jax.config.update("jax_platforms", "cpu")  # the host side runs on the CPU; the TPU or GPU is compile-only
  logging.set_verbosity(logging.WARNING)
  sizes_flag = holders["size"].value
  try:
    sizes = [parse_size(s) for s in sizes_flag] if sizes_flag else default_sizes(config)
    run(config, holders["topology"].value, sizes, max_batch=holders["max_batch"].value,
        with_eval=holders["eval"].value)
  except (CompilerMissingError, GpuCompileError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _holders = _define_flags()
  app.run(lambda argv: main(argv, _holders))
