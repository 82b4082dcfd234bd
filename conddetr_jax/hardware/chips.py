"""Accelerator chips by the ``device_kind`` JAX reports: HBM, dense bfloat16 peak, HBM bandwidth,
chip-to-chip bandwidth.

TPU figures are Google's, per chip (Cloud TPU documentation, "TPU versions": v4 32 GiB HBM2 at
1,200 GB/s and 275 bf16 TFLOP/s; v5e 16 GiB at 819 GB/s and 197, 400 GB/s of bidirectional ICI;
v5p 95 GiB at 2,765 GB/s and 459, ICI 1,200 GB/s; Trillium (v6e) 32 GiB at 1,640 GB/s and 918, ICI
800 GB/s; v4's page gives no ICI figure per chip). NVIDIA's SXM GPUs come from ``gpu_targets`` (each
figure with its datasheet there). GPUs the aot tool does not compile for, from NVIDIA's datasheets
(dense bf16 is half the "with sparsity" figure): L4 24 GB GDDR6 at 300 GB/s, 121 TFLOP/s; H100 PCIe
80 GB HBM2e at 2,000 GB/s, 756; A100 PCIe 80 GB HBM2e at 1,935 GB/s and 40 GB HBM2 at 1,555 GB/s,
312; none with an interconnect figure here (PCIe cards: NVLink bridges join pairs, if any).
"""

import dataclasses

from conddetr_jax.hardware import gpu_targets


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip: ``name`` as in topology names, HBM per chip, dense bf16 peak per chip (None: no bf16
  tensor cores, as on a V100), HBM bandwidth per chip, and the bandwidth of its links to the other
  chips (TPU ICI, NVLink; both directions together, as the vendors state it; None: not known
  here)."""

  name: str
  hbm_gib: float
  bf16_tflops: float | None
  hbm_gbs: float
  interconnect_gbs: float | None = None


# device_kind -> chip. JAX names a v5e "TPU v5 lite" and a v6e "TPU v6 lite".
TPUS = {
  "TPU v4": Chip("v4", 32, 275, 1200),
  "TPU v5 lite": Chip("v5e", 16, 197, 819, 400),
  "TPU v5e": Chip("v5e", 16, 197, 819, 400),
  "TPU v5": Chip("v5p", 95, 459, 2765, 1200),
  "TPU v5p": Chip("v5p", 95, 459, 2765, 1200),
  "TPU v6 lite": Chip("v6e", 32, 918, 1640, 800),
  "TPU v6e": Chip("v6e", 32, 918, 1640, 800),
}
_OTHER_GPUS = {
  "NVIDIA L4": Chip("l4", 24, 121, 300),
  "NVIDIA H100 PCIe": Chip("h100-pcie", 80, 756, 2000),
  "NVIDIA A100 80GB PCIe": Chip("a100-80g-pcie", 80, 312, 1935),
  "NVIDIA A100-PCIE-40GB": Chip("a100-40g-pcie", 40, 312, 1555),
}


def _chip_of_gpu(gpu: gpu_targets.GpuTarget) -> Chip:
  return Chip(gpu.name, gpu.memory_gib, gpu.bf16_tflops, gpu.memory_bandwidth_gbs, gpu.nvlink_gbs)


def chip_of_kind(device_kind: str) -> Chip | None:
  """The figures of the chip JAX calls ``device_kind``, or None for a kind this table lacks (a
  CPU)."""
  gpu = gpu_targets.by_device_kind(device_kind)
  if gpu is not None:
    return _chip_of_gpu(gpu)
  return TPUS.get(device_kind) or _OTHER_GPUS.get(device_kind)


def known_chips() -> list[Chip]:
  """Every chip of the tables once, TPUs first, then NVIDIA's GPUs."""
  gpus = [_chip_of_gpu(g) for g in gpu_targets.GPUS.values()]
  unique = {c.name: c for c in [*TPUS.values(), *gpus, *_OTHER_GPUS.values()]}
  return list(unique.values())
