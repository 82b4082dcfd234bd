"""Accelerator chips by the ``device_kind`` JAX reports: HBM, dense bfloat16 peak, HBM bandwidth.

TPU figures are Google's, per chip (Cloud TPU documentation, "TPU versions": v4 32 GiB HBM2 at
1,200 GB/s and 275 bf16 TFLOP/s; v5e 16 GiB at 819 GB/s and 197; v5p 95 GiB at 2,765 GB/s and 459;
Trillium (v6e) 32 GiB at 1,640 GB/s and 918). NVIDIA's SXM GPUs come from ``gpu_targets`` (each
figure with its datasheet there). GPUs the aot tool does not compile for, from NVIDIA's datasheets
(dense bf16 is half the "with sparsity" figure): L4 24 GB GDDR6 at 300 GB/s, 121 TFLOP/s; H100 PCIe
80 GB HBM2e at 2,000 GB/s, 756; A100 PCIe 80 GB HBM2e at 1,935 GB/s and 40 GB HBM2 at 1,555 GB/s,
312.
"""

import dataclasses

from conddetr_jax.hardware import gpu_targets


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip: ``name`` as in topology names, HBM per chip, dense bf16 peak per chip (None: no bf16
  tensor cores, as on a V100) and HBM bandwidth per chip."""

  name: str
  hbm_gib: float
  bf16_tflops: float | None
  hbm_gbs: float


# device_kind -> chip. JAX names a v5e "TPU v5 lite" and a v6e "TPU v6 lite".
TPUS = {
  "TPU v4": Chip("v4", 32, 275, 1200),
  "TPU v5 lite": Chip("v5e", 16, 197, 819),
  "TPU v5e": Chip("v5e", 16, 197, 819),
  "TPU v5": Chip("v5p", 95, 459, 2765),
  "TPU v5p": Chip("v5p", 95, 459, 2765),
  "TPU v6 lite": Chip("v6e", 32, 918, 1640),
  "TPU v6e": Chip("v6e", 32, 918, 1640),
}
_OTHER_GPUS = {
  "NVIDIA L4": Chip("l4", 24, 121, 300),
  "NVIDIA H100 PCIe": Chip("h100-pcie", 80, 756, 2000),
  "NVIDIA A100 80GB PCIe": Chip("a100-80g-pcie", 80, 312, 1935),
  "NVIDIA A100-PCIE-40GB": Chip("a100-40g-pcie", 40, 312, 1555),
}


def chip_of_kind(device_kind: str) -> Chip | None:
  """The figures of the chip JAX calls ``device_kind``, or None for a kind this table lacks (a
  CPU)."""
  gpu = gpu_targets.by_device_kind(device_kind)
  if gpu is not None:
    return Chip(gpu.name, gpu.memory_gib, gpu.bf16_tflops, gpu.memory_bandwidth_gbs)
  return TPUS.get(device_kind) or _OTHER_GPUS.get(device_kind)


def known_chips() -> list[Chip]:
  """Every chip of the tables once, TPUs first, then NVIDIA's GPUs."""
  gpus = [
    Chip(g.name, g.memory_gib, g.bf16_tflops, g.memory_bandwidth_gbs)
    for g in gpu_targets.GPUS.values()
  ]
  unique = {c.name: c for c in [*TPUS.values(), *gpus, *_OTHER_GPUS.values()]}
  return list(unique.values())
