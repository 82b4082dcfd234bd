"""The aot report's interconnect estimate: bytes received per device for a program's collectives
by ring algorithms, and their time at the chip's link bandwidth (conddetr_jax/aot/interconnect.py).
The report's line on real TPU and GPU compiles: tests/test_aot.py and tests/test_aot_gpu.py."""

import pytest

from conddetr_jax.aot import hlo, interconnect
from conddetr_jax.hardware import chips

MIB = 2**20
V5E = chips.TPUS["TPU v5 lite"]


def _collective(mib: float) -> dict:
  return {"count": 1, "bytes": mib * MIB, "bytes_by_dtype": {"bf16": mib * MIB}}


@pytest.mark.parametrize(
  "op, per_result_byte",
  [
    # Over 4 devices: an all-gather's result holds 3 parts from the others; a reduce-scatter's
    # slice gets a partial sum from each of the 3 others; an all-reduce is both, on quarters.
    ("all-gather", 3 / 4),
    ("all-to-all", 3 / 4),
    ("reduce-scatter", 3),
    ("all-reduce", 2 * 3 / 4),
    ("ragged-all-to-all", 3 / 4),
    ("collective-permute", 1),
    ("collective-broadcast", 1),
  ],
)
def test_each_collective_receives_what_its_ring_algorithm_moves(op, per_result_byte):
  assert interconnect.received_bytes({op: _collective(8)}, 4) == pytest.approx(
    per_result_byte * 8 * MIB
  )


def test_a_split_state_receives_what_a_replicated_one_does_for_the_gradients():
  # One 64 MiB gradient over 4 devices: all-reduced whole (replicated state), or reduce-scattered
  # (split state) and its weights gathered back: the same bytes, as a ring all-reduce is both.
  replicated = interconnect.received_bytes({"all-reduce": _collective(64)}, 4)
  split = interconnect.received_bytes(
    {"reduce-scatter": _collective(16), "all-gather": _collective(64)}, 4
  )
  assert split == pytest.approx(replicated) == pytest.approx(96 * MIB)
  assert interconnect.received_bytes({"all-reduce": _collective(64)}, 1) == 0


def test_the_row_gives_the_time_at_the_chips_links_beside_the_flops_at_peak():
  found = {"all-gather": _collective(160), "reduce-scatter": _collective(20)}
  row = interconnect.estimate_row(found, 4, 1, V5E, 1037e9, 1, False)
  # (120 + 60) MiB at 200 GB/s in; 1037 GFLOP at 197 TFLOP/s.
  assert "a device receives 180.0 MiB a step" in row and "ESTIMATE" in row
  assert f"{180 * MIB / 200e9 * 1e3:.2f} ms per chip" in row
  assert "against 5.26 ms of the step's FLOPs at bf16 peak" in row
  # Two devices on a chip share its links and its peak.
  assert f"{2 * 180 * MIB / 200e9 * 1e3:.2f} ms per chip" in interconnect.estimate_row(
    found, 4, 2, V5E, 1037e9, 1, False
  )


def test_without_a_link_bandwidth_or_across_gpu_hosts_the_row_gives_no_time():
  found = {"all-reduce": _collective(8)}
  v4 = chips.TPUS["TPU v4"]
  assert interconnect.estimate_row(found, 4, 1, v4, 1e12, 1, False).endswith(
    "no time: the chip's link bandwidth is unknown here"
  )
  h100 = chips.chip_of_kind("NVIDIA H100 80GB HBM3")
  assert "ms per chip" in interconnect.estimate_row(found, 8, 1, h100, 1e12, 1, True)
  assert interconnect.estimate_row(found, 16, 1, h100, 1e12, 2, True).endswith(
    "no time: part of it crosses the hosts' network, whose bandwidth is unknown here"
  )
  # A TPU slice over several hosts is one ICI network.
  assert "ms per chip" in interconnect.estimate_row(found, 16, 1, V5E, 1e12, 4, False)


def test_every_collective_the_hlo_reader_knows_has_a_ring_cost():
  assert interconnect.received_bytes({op: _collective(1) for op in hlo.COLLECTIVE_OPS}, 4) > 0


def test_one_device_has_no_traffic_between_chips():
  row = interconnect.estimate_row({}, 1, 1, V5E, 1e12, 1, False)
  assert row == "    interconnect: one device, no traffic between chips"
