"""benchmarks/step_bytes.py's reading of an optimized HLO text, on a hand-written module: what each
instruction counts, and the HBM estimate (arrays laid out in HBM; an asynchronous copy once, at
its HBM end)."""

import os
import re

import pytest

from benchmarks import step_bytes
from conddetr_jax.aot import devices as aot_devices
from tests import processes

# A bf16[4,4] is 32 bytes. Prefetch ``a`` into on-chip memory (S(1)), negate it there (a fusion
# whose body is not counted again), write the result back to HBM; prefetch the first half of ``a``
# (16 bytes) as a slice.
_MODULE = """HloModule m

%fused_negate (p: bf16[4,4]) -> bf16[4,4] {
  %p = bf16[4,4]{1,0:S(1)} parameter(0)
  ROOT %n = bf16[4,4]{1,0:S(1)} negate(%p), metadata={op_name="jit(f)/neg"}
}

ENTRY %main (a: bf16[4,4]) -> bf16[4,4] {
  %a = bf16[4,4]{1,0} parameter(0)
  %cs = (bf16[4,4]{1,0}, bf16[4,4]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) copy-start(%a)
  %cd = bf16[4,4]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  %f = bf16[4,4]{1,0:S(1)} fusion(%cd), kind=kLoop, calls=%fused_negate
  %es = (bf16[4,4]{1,0:S(1)}, bf16[4,4]{1,0}, u32[]{:S(2)}) copy-start(%f)
  %ed = bf16[4,4]{1,0} copy-done(%es)
  %ss = ((bf16[4,4]{1,0}), bf16[2,4]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%a), slice={[0:2], [0:4]}
  %sd = bf16[2,4]{1,0:S(1)} slice-done(%ss)
  ROOT %t = (bf16[4,4]{1,0}, bf16[2,4]{1,0:S(1)}) tuple(%ed, %sd)
}
"""


def test_each_kernel_counts_its_operands_and_result_and_only_hbm_arrays_count_as_hbm():
  rows = {r["name"]: r for r in step_bytes.instruction_traffic(_MODULE)}
  assert set(rows) == {"cs", "cd", "f", "es", "ed", "ss", "sd"}  # ``f``'s body is inside it
  assert rows["f"]["bytes"] == 64 and rows["f"]["hbm_bytes"] == 0  # on-chip in, on-chip out
  assert rows["f"]["op_name"] == "jit(f)/neg"  # from its body
  # The prefetch reads ``a`` from HBM (counted at its start), the write-back writes HBM (at its
  # done): each copy once. The slice reads its half of ``a``, not all of it.
  assert [rows[n]["hbm_bytes"] for n in ("cs", "cd", "es", "ed")] == [32, 0, 0, 32]
  assert [rows[n]["hbm_bytes"] for n in ("ss", "sd")] == [16, 0]


def test_hbm_bytes_reads_each_arrays_memory_space_from_its_layout():
  assert step_bytes.hbm_bytes("f32[2,3]{1,0:T(8,128)}") == 24
  assert step_bytes.hbm_bytes("f32[2,3]{1,0:T(8,128)S(1)}") == 0
  assert step_bytes.hbm_bytes("(f32[2,3]{1,0}, bf16[8]{0:S(1)}, u32[]{:S(2)})") == 24


def test_moved_bytes_counts_each_asynchronous_copy_once_by_what_it_delivers():
  # The prefetch and the write-back each deliver a bf16[4,4], the slice half of one.
  assert step_bytes.moved_bytes(step_bytes.instruction_traffic(_MODULE)) == 2 * 32 + 16


def test_xla_counts_a_prefetch_into_on_chip_memory_four_times_its_bytes():
  # What docs/accelerators.md's reading of the TPU step's bytes rests on, asked of libtpu itself.
  env = processes.libtpu_env()
  if env is None:
    if os.environ.get("CI"):
      pytest.fail("libtpu is missing: .ci/run installs it into $CONDDETR_LIBTPU_PATH")
    pytest.skip(f"libtpu is not installed ({aot_devices.install_command()})")
  proc = processes.run_python_ok("benchmarks/step_bytes.py", "--calibrate", env=env, timeout=300)
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("step_bytes calibrate")]
  fields = dict(re.findall(r"(\w+)=([\d.]+)", line))
  assert float(fields["moved_mb"]) > 0, line
  assert fields["counted_per_moved_byte"] == "4.00", line
