"""The train step's cost against the chips' rooflines: the per-stage table, the whole step on each
known chip, and the loops whose bodies XLA's cost analysis counts once.

The roofline time of a program is the larger of its FLOPs at the chip's dense bf16 peak and its
bytes accessed at the chip's HBM bandwidth. XLA's bytes accessed (after fusion) also counts
operands in on-chip memory and the copies between it and HBM, so it exceeds the HBM traffic (R50
on v5e: about 4x by ``benchmarks/step_bytes.py``'s HBM estimate; docs/accelerators.md): the
roofline of the program as counted, neither an estimate of its run time nor a bound on it. A
chip runs ``per_chip`` devices' programs, so a
device's roofline is ``per_chip`` times the chip's; per image and chip the factor cancels.
"""

from collections import Counter

from conddetr_jax.aot import stages
from conddetr_jax.hardware import chips


def images_per_s_per_chip(
  step: stages.StageCost, chip: chips.Chip | None, per_device_batch: int
) -> float | None:
  """Images per second per chip at the roofline of the whole step (None without a peak or a
  count)."""
  seconds = None if chip is None else step.roofline_s(chip)
  if not seconds:
    return None
  return per_device_batch / seconds


def _bound(cost: stages.StageCost, chip: chips.Chip) -> str:
  compute = cost.flops / (chip.bf16_tflops * 1e12)
  return "memory" if cost.bytes_accessed / (chip.hbm_gbs * 1e9) >= compute else "compute"


def stage_rows(
  table: stages.StageTable, chip: chips.Chip | None, per_chip: int, per_device_batch: int
) -> list[str]:
  """The per-stage table: GFLOP, GB accessed, FLOP per byte, roofline ms and what bounds it (on
  ``chip``, the target), each stage's share of the step's bytes; then the step minus the stages and
  the whole step."""
  with_roofline = chip is not None and chip.bf16_tflops is not None
  head = (
    f"    per-stage cost of one train step ({per_device_batch} images per device; XLA's "
    "cost_analysis per device, each stage compiled alone for this target"
    + (
      f"; roofline on {chip.name}: max(FLOPs / {chip.bf16_tflops:g} TFLOP/s, bytes / "
      f"{chip.hbm_gbs:g} GB/s) as XLA counts bytes (on-chip included), not a time"
      if with_roofline
      else "; no roofline: the chip's peak is unknown"
    )
    + "):"
  )
  rows = [
    head,
    f"      {'stage':<28}{'GFLOP':>10}{'GB':>10}{'FLOP/B':>8}{'roofline ms':>13}  "
    f"{'bound':<8}{'bytes % of step':>15}",
  ]
  named = [(name, cost) for name, cost in table.stages.items()]
  named += [("rest (step - stages)", table.rest), ("whole step", table.step)]
  for name, cost in named:
    label = {
      "criterion": "criterion (matching + losses)",
      "matching": "  matching (in criterion)",
    }.get(name, name)
    ms = "n/a" if not with_roofline else f"{per_chip * cost.roofline_s(chip) * 1e3:.2f}"
    bound = "" if not with_roofline or cost.bytes_accessed <= 0 else _bound(cost, chip)
    share = (
      f"{100 * cost.bytes_accessed / table.step.bytes_accessed:.1f}"
      if table.step.bytes_accessed
      else "n/a"
    )
    rows.append(
      f"      {label:<28}{cost.flops / 1e9:>10.1f}{cost.bytes_accessed / 1e9:>10.3f}"
      f"{cost.flops_per_byte:>8.1f}{ms:>13}  {bound:<8}{share:>15}"
    )
  return rows


def chip_rows(step: stages.StageCost, per_device_batch: int, target: str | None) -> list[str]:
  """The whole step's roofline on every chip the tables know, from this target's counts."""
  parts = []
  for chip in chips.known_chips():
    rate = images_per_s_per_chip(step, chip, per_device_batch)
    if rate is None:
      continue
    ridge = chip.bf16_tflops * 1e12 / (chip.hbm_gbs * 1e9)
    parts.append(
      f"{chip.name}{' (target)' if chip.name == target else ''} "
      f"{step.roofline_s(chip) * 1e3:.3g} ms = {rate:.4g} img/s (ridge {ridge:.0f} FLOP/B)"
    )
  return [
    f"    whole step at each chip's roofline ({step.flops_per_byte:.1f} FLOP/B; these counts, "
    "so only indicative for another chip, whose compiler fuses differently), per chip of "
    f"{per_device_batch} images: " + "; ".join(parts)
  ]


def loop_rows(loops: list[dict]) -> list[str]:
  """The compiled step's while loops, grouped by where they come from: cost_analysis counts each
  body once."""
  if not loops:
    return ["    loops in the compiled step: none (cost_analysis counts every op)"]
  counts = Counter((loop["source"], loop["trip_count"]) for loop in loops)
  parts = [
    f"{source} x{n}" + (f" (trip count {trips})" if trips is not None else " (trip count unknown)")
    for (source, trips), n in counts.items()
  ]
  return [
    f"    loops in the compiled step ({len(loops)} while loops; cost_analysis counts each body "
    f"once, whatever its trips): {', '.join(parts)}"
  ]
