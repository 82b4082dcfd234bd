"""NVIDIA GPUs as the XLA GPU compiler needs them described, to compile for them without one.

The compiler learns a GPU from a ``GpuTargetConfig`` (XLA's
``stream_executor/device_description.proto``): its compute capability chooses the instructions, and
the counts below feed its cost model, fusion and tiling decisions. On a real GPU the driver fills it
in; here ``GpuTarget.target_config`` writes it from the vendors' published figures, so that
``jax.experimental.topologies.get_topology_desc( platform="cuda", target_config=...)`` gives
compile-only devices of that GPU on a CPU machine.

Every figure is data in this file, each with its source. Sources:
  [CC]   NVIDIA CUDA C++ Programming Guide, "Compute Capabilities", table "Technical
         Specifications per Compute Capability" (columns 7.0, 8.0, 9.0).
  [V100] NVIDIA Tesla V100 GPU Architecture whitepaper (2017) and the Tesla V100 datasheet
         (SXM2: 16 or 32 GB HBM2, 900 GB/s, 125 TFLOPS tensor (FP16, no bfloat16), NVLink 300
         GB/s).
  [A100] NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020) and the A100 datasheet
         (SXM4 40 GB HBM2 1,555 GB/s; 80 GB HBM2e 2,039 GB/s; BF16 tensor 312 TFLOPS dense;
         NVLink 600 GB/s).
  [H100] NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022) and the H100 datasheet
         (SXM5 80 GB HBM3, 3.35 TB/s, BF16 tensor 989 TFLOPS dense (1,979 with sparsity), NVLink
         900 GB/s).
  [H200] NVIDIA H200 datasheet (SXM: 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense, NVLink 900
         GB/s; the same GH100 GPU as the H100 SXM5, so the same SM count, L2 and clocks).
  [SMI]  The product name the NVIDIA driver reports (``nvidia-smi``, ``cudaDeviceProp::name``),
         which JAX shows as ``device_kind``.
"""

import dataclasses
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ComputeCapabilityLimits:
  """Per-SM and per-block limits fixed by the compute capability [CC]."""

  shared_memory_per_sm_kib: int
  shared_memory_per_block_optin_kib: int
  threads_per_sm: int


# [CC]: "Maximum amount of shared memory per SM" and "Maximum amount of shared memory per thread
# block" (opt-in); "Maximum number of resident threads per SM". Common to 7.0-9.0 (same table):
# 1024 threads per block, warp 32, 64 K 32-bit registers per SM and per block, 48 KiB of shared
# memory per block without opt-in, grid limits 2^31-1 x 65535 x 65535.
CC_LIMITS = {
  (7, 0): ComputeCapabilityLimits(96, 96, 2048),
  (8, 0): ComputeCapabilityLimits(164, 163, 2048),
  (9, 0): ComputeCapabilityLimits(228, 227, 2048),
}


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """One NVIDIA GPU model (SXM form factor, the one in 8-GPU training nodes).

  Attributes:
    name: as in ``--topology=<name>:<count>``.
    device_kind: the driver's product name [SMI] (what ``jax.devices()[0].device_kind`` says on it).
    memory_gib: HBM per GPU as the datasheet states it (GB of HBM stacks, taken as GiB as the TPU
      path takes a v5e's 16: the driver reports about 1% less as usable).
    bf16_tflops: dense bfloat16 tensor-core peak; None where the GPU has no bfloat16 tensor cores.
    compute_capability: (major, minor).
    sm_count, fp32_cores_per_sm, memory_bandwidth_gbs, l2_cache_kib, boost_clock_ghz: the
      architecture whitepaper's and datasheet's figures (module docstring).
    nvlink_gbs: the datasheet's NVLink bandwidth per GPU (both directions together).
  """

  name: str
  device_kind: str
  memory_gib: float
  bf16_tflops: float | None
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_cores_per_sm: int
  memory_bandwidth_gbs: float
  l2_cache_kib: int
  boost_clock_ghz: float
  nvlink_gbs: float

  def target_config(self) -> str:
    """The ``GpuTargetConfig`` text proto that ``topologies.get_topology_desc`` takes."""
    limits = CC_LIMITS[self.compute_capability]
    major, minor = self.compute_capability
    # cuDNN 9.8: the lowest version the jax-cuda12 plugin of requirements-gpu-compiler.txt accepts
    # (its wheel's `nvidia-cudnn-cu12>=9.8`): the compiler then uses no cuDNN feature a supported
    # installation might lack.
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: {48 * 1024}
  shared_memory_per_core: {limits.shared_memory_per_sm_kib * 1024}
  threads_per_core_limit: {limits.threads_per_sm}
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_cores_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth_gbs * 1e9)}
  l2_cache_size: {self.l2_cache_kib * 1024}
  clock_rate_ghz: {self.boost_clock_ghz}
  device_memory_size: {int(self.memory_gib * GIB)}
  shared_memory_per_block_optin: {limits.shared_memory_per_block_optin_kib * 1024}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.device_kind}"
"""


def _v100(memory_gib: int) -> GpuTarget:
  # [V100]: 80 SMs of 64 FP32 cores, 6144 KB L2, 1530 MHz boost (SXM2), 900 GB/s.
  return GpuTarget(
    f"v100-{memory_gib}g",
    f"Tesla V100-SXM2-{memory_gib}GB",
    memory_gib,
    None,
    (7, 0),
    80,
    64,
    900,
    6144,
    1.53,
    300,
  )


def _a100(memory_gib: int, bandwidth_gbs: float) -> GpuTarget:
  # [A100]: 108 SMs of 64 FP32 cores, 40 MB L2, 1410 MHz boost.
  return GpuTarget(
    f"a100-{memory_gib}g",
    f"NVIDIA A100-SXM4-{memory_gib}GB",
    memory_gib,
    312,
    (8, 0),
    108,
    64,
    bandwidth_gbs,
    40 * 1024,
    1.41,
    600,
  )


# --topology names -> GPU. H100 and H200 [H100], [H200]: 132 SMs of 128 FP32 cores, 50 MB L2;
# 1980 MHz, the SXM5 part's maximum boost clock (the datasheet gives none; the whitepaper's table
# left it "not finalized"; 1980 MHz is what the driver reports as the clock rate of an H100 SXM5).
GPUS = {
  t.name: t
  for t in (
    GpuTarget(
      "h100", "NVIDIA H100 80GB HBM3", 80, 989, (9, 0), 132, 128, 3350, 50 * 1024, 1.98, 900
    ),
    GpuTarget("h200", "NVIDIA H200", 141, 989, (9, 0), 132, 128, 4800, 50 * 1024, 1.98, 900),
    _a100(80, 2039),
    _a100(40, 1555),
    _v100(16),
    _v100(32),
  )
}
# `gpu:N`: the GPU of most training nodes bought today.
DEFAULT_GPU = "h100"


@dataclasses.dataclass(frozen=True)
class GpuTopology:
  """``<gpu>:<count>`` (one host) or ``<gpu>:<hosts>x<count>`` (``count`` GPUs on each of
  ``hosts``)."""

  gpu: GpuTarget
  hosts: int
  per_host: int

  @property
  def devices(self) -> int:
    return self.hosts * self.per_host

  @property
  def topology_string(self) -> str:
    """XLA's "<partitions>x<hosts per partition>x<devices per host>", one partition (an NVLink/IB
    cluster)."""
    return f"1x{self.hosts}x{self.per_host}"


_TOPOLOGY = re.compile(r"(?P<gpu>[a-z0-9-]+):(?:(?P<hosts>\d+)x)?(?P<count>\d+)")


def parse_topology(name: str) -> GpuTopology | None:
  """``h100:8`` -> 8 H100 on one host; ``h100:2x8`` -> 2 hosts of 8; ``gpu:N`` -> N of
  ``DEFAULT_GPU``.

  Returns None for a name that is no GPU's (a TPU slice such as ``v5e:2x2``).

  Raises:
    ValueError: a GPU's name with a count below 1.
  """
  m = _TOPOLOGY.fullmatch(name.strip().lower())
  if m is None:
    return None
  gpu = DEFAULT_GPU if m["gpu"] == "gpu" else m["gpu"]
  if gpu not in GPUS:
    return None
  hosts, count = int(m["hosts"] or 1), int(m["count"])
  if hosts < 1 or count < 1:
    raise ValueError(
      f"--topology={name!r}: the counts must be at least 1, e.g. {gpu}:8 or {gpu}:2x8"
    )
  return GpuTopology(GPUS[gpu], hosts, count)


def by_device_kind(device_kind: str) -> GpuTarget | None:
  """The GPU whose driver name is ``device_kind`` (as ``GpuTarget.target_config`` sets it), or
  None."""
  return next((t for t in GPUS.values() if t.device_kind == device_kind), None)
