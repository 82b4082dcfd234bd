"""Test-wide setup: quiet TensorFlow, keep it off accelerators, and fix JAX to CPU float32."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
