"""Test-wide setup: quiet TensorFlow, keep it off accelerators, fix JAX to CPU float32, and share
one persistent compilation cache between the tests and every process they start."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_a_compilation_cache() -> None:
  """Points JAX's persistent compilation cache at one folder for this test run.

  Set before JAX is imported, the variables reach the pytest process and, through the
  environment, every train.py / eval.py / worker process a test starts: the tiny programs those
  compile again and again are compiled once. The folder is new for each run (a clean clone
  measures what CI pays) and removed at exit; a cache folder set by the caller is kept and used.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="conddetr-tests-xla-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_a_compilation_cache()

# The suite's time is mostly XLA:CPU compiling many small programs once each. At LLVM's
# optimisation level 0 they compile about 1.5x as fast, and run about 3x slower
# (benchmarks/xla_cpu_opt_level.py; docs/testing.md); the same HLO runs, with the same library
# convolutions and matrix products. The train.py runs compile at level 0 too: test_tiny's step is
# small enough that its ten steps cost less than compiling at level 2 would (docs/testing.md).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()


def cpu_devices_xla_flags(count: int) -> str:
  """XLA_FLAGS for a process the tests start with ``count`` CPU devices (compiling at level 0)."""
  return f"--xla_force_host_platform_device_count={count} {FAST_COMPILE_FLAG}"


def _stub_missing_torchvision_ops():
  """Declares torchvision's `nms`/`qnms` schemas when its compiled extension cannot load.

  PyPI's torchvision wheel is a CUDA build; next to the CPU torch its `_C` extension fails to
  load, and `import torchvision` (pulled in by timm, which HF's timm backbone needs) then dies
  registering fake kernels for these two ops: "operator torchvision::nms does not exist".
  Declaring the schemas (signatures as in torchvision's csrc/ops) lets the import finish; the
  reference model never calls them. Must run before anything imports torchvision.

  Returns:
    The `torch.library.Library` holding the schemas (keep it alive: dropping it unregisters
    them), or None when torch or torchvision is absent or the extension loads by itself.
  """
  import importlib.machinery
  import importlib.util

  if importlib.util.find_spec("torch") is None:
    return None
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None:
    return None
  import torch

  package_dir = os.path.dirname(spec.origin)
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    extension = os.path.join(package_dir, "_C" + suffix)
    if os.path.exists(extension):
      try:
        torch.ops.load_library(extension)
        return None  # A matching build: torchvision defines its ops itself.
      except OSError:
        break
  library = torch.library.Library("torchvision", "DEF")
  library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  return library


_TORCHVISION_OPS_STUB = _stub_missing_torchvision_ops()


# The modules that take longest, longest first: pytest-xdist hands whole modules to its two
# processes in collection order (pytest.ini's --no-loadscope-reorder: by default it hands out the
# modules with the most tests first, which left the two slowest, of few tests, to run last while
# the other process idled), so starting these first keeps both busy to the end.
# Ranked by each module's total time in a profiled run of the suite (docs/testing.md).
_SLOWEST_MODULES = (
  "test_training_e2e.py",
  "test_multihost_faults.py",
  "test_parity.py",
  "test_model.py",
  "test_training_accumulation.py",
  "test_memory_efficient.py",
  "test_cli.py",
  "test_training_step.py",
  "test_group_detr.py",
  "test_dense_head.py",
  "test_convergence.py",
  "test_evaluation.py",
  "test_convert_cli.py",
  "test_data_pipeline.py",
  "test_training_ema.py",
  "test_training_parallel.py",
  "test_cloud_storage.py",
  "test_console.py",
)


def pytest_collection_modifyitems(items):
  """Runs the slowest modules first (see _SLOWEST_MODULES); the rest keep their order."""
  rank = {name: i for i, name in enumerate(_SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
