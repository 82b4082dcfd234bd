"""Every accelerator's figures in the tools equal the vendor's published datasheet numbers.

The figures below are written out from the vendors' documents, not read from the code, so a wrong
value in conddetr_jax/hardware/gpu_targets.py or hardware/chips.py fails here (a wrong HBM size
would make every "fits" verdict of the aot tool wrong). Memory is the datasheet's GB figure, which
the tools take as GiB (gpu_targets.GpuTarget.memory_gib says why).

Sources:
  NVIDIA Tesla V100 datasheet: V100 SXM2, 16 or 32 GB HBM2, 900 GB/s; no bfloat16 tensor cores;
    NVLink 300 GB/s.
  NVIDIA A100 Tensor Core GPU datasheet: A100 SXM4 40 GB HBM2 1,555 GB/s, 80 GB HBM2e 2,039 GB/s;
    BF16 tensor core 312 TFLOPS (dense; 624 with sparsity); NVLink 600 GB/s.
  NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, 80 GB, 3.35 TB/s; BF16 tensor core 1,979 TFLOPS
    with sparsity, i.e. 989 dense; NVLink 900 GB/s.
  NVIDIA H200 Tensor Core GPU datasheet: H200 SXM, 141 GB, 4.8 TB/s; BF16 tensor core 1,979 TFLOPS
    with sparsity, i.e. 989 dense; NVLink 900 GB/s.
  NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s; BF16 242 TFLOPS with sparsity (121 dense).
  NVIDIA H100 PCIe datasheet: 80 GB HBM2e, 2 TB/s; BF16 1,513 TFLOPS with sparsity (756 dense).
  NVIDIA A100 PCIe datasheet: 80 GB HBM2e 1,935 GB/s, 40 GB HBM2 1,555 GB/s; BF16 312 dense.
  Google Cloud TPU documentation, "TPU versions" (system architecture pages per generation):
    v4 32 GiB HBM at 1,200 GB/s, 275 bf16 TFLOPS (no ICI figure per chip); v5e 16 GiB, 819 GB/s,
    197, bidirectional ICI 400 GB/s; v5p 95 GiB, 2,765 GB/s, 459, ICI 1,200 GB/s; v6e (Trillium)
    32 GiB, 1,640 GB/s, 918, ICI 800 GB/s.
"""

import pytest

from conddetr_jax.aot import devices
from conddetr_jax.hardware import chips, gpu_targets

# --topology name -> (HBM GB, dense bf16 TFLOP/s or None, HBM bandwidth GB/s, NVLink GB/s), NVIDIA
# datasheets.
NVIDIA = {
  "v100-16g": (16, None, 900, 300),
  "v100-32g": (32, None, 900, 300),
  "a100-40g": (40, 312, 1555, 600),
  "a100-80g": (80, 312, 2039, 600),
  "h100": (80, 989, 3350, 900),
  "h200": (141, 989, 4800, 900),
}

# device_kind (as JAX reports it) -> (chip, HBM GiB, dense bf16 TFLOP/s, HBM GB/s, ICI GB/s), Google
# Cloud TPU docs.
GOOGLE = {
  "TPU v4": ("v4", 32, 275, 1200, None),
  "TPU v5 lite": ("v5e", 16, 197, 819, 400),
  "TPU v5e": ("v5e", 16, 197, 819, 400),
  "TPU v5": ("v5p", 95, 459, 2765, 1200),
  "TPU v5p": ("v5p", 95, 459, 2765, 1200),
  "TPU v6 lite": ("v6e", 32, 918, 1640, 800),
  "TPU v6e": ("v6e", 32, 918, 1640, 800),
}

# GPUs the telemetry knows but the aot tool does not compile for: device_kind -> (chip, GB, bf16,
# GB/s).
OTHER_NVIDIA = {
  "NVIDIA L4": ("l4", 24, 121, 300),
  "NVIDIA H100 PCIe": ("h100-pcie", 80, 756, 2000),
  "NVIDIA A100 80GB PCIe": ("a100-80g-pcie", 80, 312, 1935),
  "NVIDIA A100-PCIE-40GB": ("a100-40g-pcie", 40, 312, 1555),
}


def _device(kind: str) -> object:
  """A stand-in for a JAX device: the tools read only its ``device_kind``."""
  return type("Device", (), {"device_kind": kind})()


@pytest.mark.parametrize("name", sorted(NVIDIA))
def test_each_gpu_has_its_datasheet_memory_bf16_peak_and_bandwidth(name):
  memory_gb, bf16_tflops, bandwidth_gbs, nvlink_gbs = NVIDIA[name]
  gpu = gpu_targets.GPUS[name]
  assert gpu.memory_gib == memory_gb
  assert gpu.bf16_tflops == bf16_tflops
  assert gpu.memory_bandwidth_gbs == bandwidth_gbs
  # What the compiler is told and what the aot tool compares peaks with.
  assert f"device_memory_size: {memory_gb * 2**30}\n" in gpu.target_config()
  assert f"memory_bandwidth: {bandwidth_gbs * 10**9}\n" in gpu.target_config()
  assert devices.chip_of(_device(gpu.device_kind)) == chips.Chip(
    name, memory_gb, bf16_tflops, bandwidth_gbs, nvlink_gbs
  )


def test_every_gpu_of_the_tool_is_pinned():
  assert set(gpu_targets.GPUS) == set(NVIDIA)


@pytest.mark.parametrize("kind", sorted(GOOGLE))
def test_each_tpu_chip_has_its_documented_memory_and_bf16_peak(kind):
  assert devices.chip_of(_device(kind)) == chips.Chip(*GOOGLE[kind])


def test_every_tpu_chip_of_the_tool_is_pinned():
  assert set(chips.TPUS) == set(GOOGLE)


@pytest.mark.parametrize("kind", sorted(OTHER_NVIDIA))
def test_each_other_gpu_has_its_datasheet_figures(kind):
  assert chips.chip_of_kind(kind) == chips.Chip(*OTHER_NVIDIA[kind])
