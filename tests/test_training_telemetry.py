"""Training's speed figures (training/telemetry.py) and the compile announcer's FLOP count."""

import pytest

from conddetr_jax import progress
from conddetr_jax.hardware import chips
from conddetr_jax.training import telemetry


def test_a_window_gives_throughput_step_times_input_share_tflops_and_mfu():
  speed = telemetry.Telemetry("TPU v5 lite", num_devices=4, global_batch=8)
  speed.compile_s, speed.eval_s = 12.0, 3.0
  scalars = speed.window(steps=4, wall_s=2.0, input_wait_s=0.5, flops_per_device=4e12)
  assert scalars == pytest.approx(
    {
      "images_per_s": 16.0,
      "images_per_s_per_device": 4.0,
      "step_s": 0.5,
      "step_s_without_input": 0.375,
      "input_wait_share": 0.25,
      "compile_s": 12.0,
      "eval_s": 3.0,
      "tflops_per_device": 2.0,
      "mfu": 2.0 / 197,
    }
  )


def test_accumulated_micro_batches_count_the_scanned_flops_once_per_micro_batch():
  plain = telemetry.Telemetry("TPU v5 lite", 1, 8).window(1, 1.0, 0.0, 1e12)
  accumulated = telemetry.Telemetry("TPU v5 lite", 1, 8, accum_steps=4).window(1, 1.0, 0.0, 1e12)
  assert accumulated["tflops_per_device"] == 4 * plain["tflops_per_device"] == 4.0
  assert accumulated["mfu"] == pytest.approx(4 * plain["mfu"])


def test_no_mfu_for_an_unknown_device_and_no_tflops_without_a_count(caplog):
  # The absl logger's own level: a command run in this process earlier may have raised it.
  with caplog.at_level("INFO", logger="absl"):
    cpu = telemetry.Telemetry("cpu", 1, 2)
  assert "MFU is not reported" in caplog.text
  assert (
    "mfu" not in cpu.window(2, 1.0, 0.0, 1e9)
    and cpu.window(2, 1.0, 0.0, 1e9)["tflops_per_device"] == 1e-3
  )
  assert not {"mfu", "tflops_per_device"} & set(
    telemetry.Telemetry("TPU v4", 1, 2).window(2, 1.0, 0.0, None)
  )


def test_the_peak_table_knows_each_gpu_the_aot_tool_compiles_for_and_the_tpus():
  assert chips.chip_of_kind("NVIDIA H100 80GB HBM3").bf16_tflops == 989
  assert chips.chip_of_kind("TPU v6 lite").bf16_tflops == 918
  assert chips.chip_of_kind("Tesla V100-SXM2-16GB").bf16_tflops is None  # no bf16 tensor cores
  assert chips.chip_of_kind("NVIDIA L4").bf16_tflops == 121
  assert chips.chip_of_kind("cpu") is None


def test_the_compile_announcer_counts_the_flops_of_the_steps_it_ran():
  counts = {(64, 64): 5.0, (64, 128): None}
  announcer = progress.CompileAnnouncer(
    lambda state, batch: state, lambda state, batch: counts[_hw(batch)]
  )
  for hw in ((64, 64), (64, 64), (64, 64)):
    announcer(0, {"image": _Image(hw)})
  assert announcer.take_flops() == 15.0 and announcer.take_flops() == 0.0
  announcer(0, {"image": _Image((64, 64))})
  announcer(0, {"image": _Image((64, 128))})  # a program without a count: the window has none
  assert announcer.take_flops() is None
  announcer(0, {"image": _Image((64, 64))})
  assert announcer.take_flops() == 5.0


class _Image:
  def __init__(self, hw):
    self.shape = (1, *hw, 3)


def _hw(batch):
  return tuple(batch["image"].shape[1:3])
