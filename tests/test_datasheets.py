"""Every accelerator's figures in the tools equal the vendor's published datasheet numbers.

The figures below are written out from the vendors' documents, not read from the code, so a wrong
value in conddetr_jax/gpu_targets.py or conddetr_jax/aot.py fails here (a wrong HBM size would make
every "fits" verdict of the aot tool wrong). Memory is the datasheet's GB figure, which the tools
take as GiB (gpu_targets.GpuTarget.memory_gib says why).

Sources:
  NVIDIA Tesla V100 datasheet: V100 SXM2, 16 or 32 GB HBM2, 900 GB/s; no bfloat16 tensor cores.
  NVIDIA A100 Tensor Core GPU datasheet: A100 SXM4 40 GB HBM2 1,555 GB/s, 80 GB HBM2e 2,039 GB/s;
    BF16 tensor core 312 TFLOPS (dense; 624 with sparsity).
  NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, 80 GB, 3.35 TB/s; BF16 tensor core 1,979 TFLOPS
    with sparsity, i.e. 989 dense.
  NVIDIA H200 Tensor Core GPU datasheet: H200 SXM, 141 GB, 4.8 TB/s; BF16 tensor core 1,979 TFLOPS
    with sparsity, i.e. 989 dense.
  Google Cloud TPU documentation, "TPU versions" (system architecture pages per generation):
    v4 32 GiB HBM, 275 bf16 TFLOPS; v5e 16 GiB, 197; v5p 95 GiB, 459; v6e (Trillium) 32 GiB, 918.
"""

import pytest

from conddetr_jax import aot, gpu_targets

# --topology name -> (HBM GB, dense bf16 TFLOP/s or None, HBM bandwidth GB/s), NVIDIA datasheets.
NVIDIA = {
    "v100-16g": (16, None, 900),
    "v100-32g": (32, None, 900),
    "a100-40g": (40, 312, 1555),
    "a100-80g": (80, 312, 2039),
    "h100": (80, 989, 3350),
    "h200": (141, 989, 4800),
}

# device_kind (as JAX reports it) -> (chip, HBM GiB, dense bf16 TFLOP/s), Google Cloud TPU docs.
GOOGLE = {
    "TPU v4": ("v4", 32, 275),
    "TPU v5 lite": ("v5e", 16, 197),
    "TPU v5e": ("v5e", 16, 197),
    "TPU v5": ("v5p", 95, 459),
    "TPU v5p": ("v5p", 95, 459),
    "TPU v6 lite": ("v6e", 32, 918),
    "TPU v6e": ("v6e", 32, 918),
}


def _device(kind: str) -> object:
  """A stand-in for a JAX device: the tools read only its ``device_kind``."""
  return type("Device", (), {"device_kind": kind})()


@pytest.mark.parametrize("name", sorted(NVIDIA))
def test_each_gpu_has_its_datasheet_memory_bf16_peak_and_bandwidth(name):
  memory_gb, bf16_tflops, bandwidth_gbs = NVIDIA[name]
  gpu = gpu_targets.GPUS[name]
  assert gpu.memory_gib == memory_gb
  assert gpu.bf16_tflops == bf16_tflops
  assert gpu.memory_bandwidth_gbs == bandwidth_gbs
  # What the compiler is told and what the aot tool compares peaks with.
  assert f"device_memory_size: {memory_gb * 2**30}\n" in gpu.target_config()
  assert f"memory_bandwidth: {bandwidth_gbs * 10**9}\n" in gpu.target_config()
  assert aot.chip_of(_device(gpu.device_kind)) == aot.Chip(name, memory_gb, bf16_tflops)


def test_every_gpu_of_the_tool_is_pinned():
  assert set(gpu_targets.GPUS) == set(NVIDIA)


@pytest.mark.parametrize("kind", sorted(GOOGLE))
def test_each_tpu_chip_has_its_documented_memory_and_bf16_peak(kind):
  name, hbm_gib, bf16_tflops = GOOGLE[kind]
  assert aot.chip_of(_device(kind)) == aot.Chip(name, hbm_gib, bf16_tflops)


def test_every_tpu_chip_of_the_tool_is_pinned():
  assert set(aot.CHIPS) == set(GOOGLE)
