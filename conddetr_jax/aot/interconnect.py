"""What a program's collectives cost in chip-to-chip traffic: an estimate from the compiled text.

``hlo.collectives`` gives each collective's result bytes per device. What a device receives for
them depends on the algorithm; this takes the ring (bandwidth-optimal) algorithms over a group of
N devices, where a device receives, per byte of its result:

- all-gather, all-to-all: (N - 1) / N (every part but its own);
- reduce-scatter: N - 1 (a partial sum of its slice from each other device);
- all-reduce: 2 (N - 1) / N (a reduce-scatter, then an all-gather of the sums);
- collective-permute, collective-broadcast: 1.

N is the group the step's collectives run over: every device of the slice (the ``data`` axis
spans the mesh). At the chip's link bandwidth (``chips.Chip.interconnect_gbs``, both directions
together; a chip receives on half of it) that is a lower bound on the time the links are busy, not
a prediction of the step's time: XLA runs collectives asynchronously beside the compute, and small
ones pay latency rather than bandwidth.
"""

from typing import Mapping

from conddetr_jax.hardware import chips

_RECEIVED_PER_RESULT_BYTE = {
  "all-gather": lambda n: (n - 1) / n,
  "all-to-all": lambda n: (n - 1) / n,
  "ragged-all-to-all": lambda n: (n - 1) / n,
  "reduce-scatter": lambda n: n - 1,
  "all-reduce": lambda n: 2 * (n - 1) / n,
  "collective-permute": lambda n: 1,
  "collective-broadcast": lambda n: 1,
}


def received_bytes(collectives: Mapping[str, Mapping], group_size: int) -> float:
  """Bytes one device receives for ``collectives`` (``hlo.collectives``'s result) by ring
  algorithms over ``group_size`` devices (module docstring)."""
  if group_size < 2:
    return 0.0
  return sum(
    _RECEIVED_PER_RESULT_BYTE[op](group_size) * found["bytes"] for op, found in collectives.items()
  )


def estimate_row(
  collectives: Mapping[str, Mapping],
  devices: int,
  per_chip: int,
  chip: chips.Chip | None,
  flops_per_device: float,
  hosts: int,
  gpu: bool,
) -> str:
  """The aot report's line: MiB received per device and step, and the time at the chip's link
  bandwidth beside the time of the step's FLOPs at its bf16 peak."""
  if devices < 2:
    return "    interconnect: one device, no traffic between chips"
  received = received_bytes(collectives, devices)
  head = (
    f"    interconnect, ESTIMATE (not a measurement): a device receives {received / 2**20:.1f} MiB "
    f"a step for these collectives (ring algorithms over the {devices} devices)"
  )
  if received == 0:
    return head
  if gpu and hosts > 1:
    return (
      head + "; no time: part of it crosses the hosts' network, whose bandwidth is unknown here"
    )
  if chip is None or chip.interconnect_gbs is None:
    return head + "; no time: the chip's link bandwidth is unknown here"
  link_s = per_chip * received / (chip.interconnect_gbs / 2 * 1e9)
  row = (
    f"{head}; at {chip.name}'s {chip.interconnect_gbs:g} GB/s of links (both directions; "
    f"{chip.interconnect_gbs / 2:g} in) {link_s * 1e3:.2f} ms per chip"
  )
  if chip.bf16_tflops is None:
    return row
  compute_s = per_chip * flops_per_device / (chip.bf16_tflops * 1e12)
  return row + f", against {compute_s * 1e3:.2f} ms of the step's FLOPs at bf16 peak"
