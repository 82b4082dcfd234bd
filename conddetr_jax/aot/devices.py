"""The compile-only devices of a TPU slice or GPU node, and the figures of their chips."""

import importlib.util
import os
import sys
from typing import Any, Sequence

import jax

from conddetr_jax.hardware import chips, gpu_targets


class CompilerMissingError(RuntimeError):
  """The compiler for the named topology is not installed (the message says how to install it)."""


class LibtpuMissingError(CompilerMissingError):
  """The TPU compiler (the ``libtpu`` wheel) is not installed."""


# Where .ci/run and the README install the GPU compiler: a folder of its own, kept off the test
# environment's path (a CUDA plugin on it would make every JAX process look for a GPU).
GPU_COMPILER_PATH_VAR = "CONDDETR_GPU_COMPILER_PATH"
# The GPU compiler's JAX plugin (jax-cuda12-pjrt): CUDA 12, because CUDA 13's ptxas no longer
# compiles for compute capability 7.0 (the V100).
_GPU_PLUGIN = "jax_plugins.xla_cuda12"
# Compile options for every GPU program. Without a GPU there is no autotuning, and XLA's Triton GEMM
# emitter must then pick tile sizes by its heuristics, which fail for some of the model's matrix
# products ("Couldn't find output tile sizes that satisfy hlo: %dot ... out_proj"); with it off,
# every dot is a cuBLAS call, as XLA also falls back to when autotuning finds no better Triton
# tiling.
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
    raise LibtpuMissingError(
      f"compiling for a TPU slice needs the TPU compiler (libtpu), which is not installed. "
      f"Install it with: {install_command()}   (no TPU needed)"
    )
  _quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise LibtpuMissingError(
        f"JAX found no TPU compiler: {e}. Install it with: {install_command()}"
      ) from e
    if "INVALID_ARGUMENT" not in str(e) and "NOT_FOUND" not in str(e):
      raise
    raise ValueError(
      f"--topology={name!r} is not a TPU slice libtpu knows (e.g. v5e:2x2, v5p:2x2x1, "
      f"v4:2x2x2, v6e:2x2): {e}"
    ) from e


def gpu_install_command() -> str:
  """The commands that install the GPU compiler into a folder of its own and point the tool at
  it."""
  return (
    f"pip install --target ~/conddetr-gpu-compiler -r requirements-gpu-compiler.txt && "
    f"export {GPU_COMPILER_PATH_VAR}=~/conddetr-gpu-compiler"
  )


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
    CompilerMissingError: the GPU compiler is neither importable nor in
      ``$CONDDETR_GPU_COMPILER_PATH``.
  """
  folder = os.environ.get(GPU_COMPILER_PATH_VAR)
  if folder and os.path.isdir(folder) and folder not in sys.path:
    sys.path.append(folder)
  if not gpu_compiler_importable():
    raise CompilerMissingError(
      "compiling for a GPU needs the GPU compiler (jax-cuda12-pjrt), which is not installed"
      f"{f' in {GPU_COMPILER_PATH_VAR}={folder}' if folder else ''}. Install it with: "
      f"{gpu_install_command()}   (no GPU needed)"
    )
  # The plugin checks the CUDA runtime libraries' versions when it loads: none are installed (none
  # are needed to compile), and the host side runs on the CPU.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    desc = topologies.get_topology_desc(
      platform="cuda", target_config=topology.gpu.target_config(), topology=topology.topology_string
    )
  except NotImplementedError as e:  # JAX registered its plugins before the folder was on the path
    raise CompilerMissingError(
      f"JAX started without the GPU compiler ({e}): put {folder or 'its folder'} on "
      "PYTHONPATH before JAX starts"
    ) from e
  return list(desc.devices)


def devices_of(name: str) -> list[Any]:
  """The compile-only devices of a GPU node (``h100:8``, ``gpu:4``, ``h100:2x8``) or TPU slice
  (``v5e:2x2``)."""
  gpu = gpu_targets.parse_topology(name)
  return topology_devices(name) if gpu is None else gpu_devices(gpu)


def is_gpu(device: Any) -> bool:
  """Whether ``device`` (compile-only or real) is an NVIDIA GPU."""
  return device.platform in ("gpu", "cuda")


def chip_of(device: Any) -> chips.Chip | None:
  """The chip's figures for a (compile-only or real) device, or None for a kind ``chips`` lacks."""
  return chips.chip_of_kind(device.device_kind)


def devices_per_chip(devices: Sequence[Any]) -> int:
  """JAX devices per physical chip (2 where each TensorCore is a device, as on v4 without
  megacore)."""
  coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
  return max(1, len(devices) // len(coords)) if coords else 1
