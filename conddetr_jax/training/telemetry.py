"""Training speed, every log interval: throughput, step time with and without input wait, TFLOP/s
per device and model FLOPs utilisation (MFU), with compile and evaluation time kept apart.

Definitions (docs/accelerators.md, "Telemetry"):
- a window is the steps since the last log line; its wall time excludes compiling and evaluating;
- ``input_wait_share``: the part of that wall time the loop spent waiting for the next batch (host
  pipeline and transfer not keeping up); ``step_s_without_input`` is the rest per step;
- ``tflops_per_device``: the compiled step's FLOPs per device (XLA's ``cost_analysis``: a
  multiply-add counts 2, elementwise ops count too) times the steps, over the window's wall time;
- ``mfu``: that over the device's dense bf16 peak (``hardware.chips``; float32 runs are held
  against the same peak). A device kind the table lacks (a CPU) gets no MFU, said once.
With gradient accumulation XLA counts the scan over K micro-batches once, so its FLOPs are
multiplied by K: the optimizer update outside the scan (under 0.1% of an R50 step) is then counted
K times.
"""

from typing import Any

from absl import logging
import jax

from conddetr_jax.hardware import chips

# The fields that time something: they differ between two runs that compute the same (a resumed
# run's records equal an uninterrupted run's but for these).
TIMING_KEYS = frozenset(
  {
    "images_per_s",
    "images_per_s_per_device",
    "step_s",
    "step_s_without_input",
    "input_wait_share",
    "tflops_per_device",
    "mfu",
    "compile_s",
    "eval_s",
    "eval_images_per_s",
  }
)


class Telemetry:
  """Turns a log window's counts into the scalars ``metrics.jsonl`` and TensorBoard record."""

  def __init__(self, device_kind: str, num_devices: int, global_batch: int, accum_steps: int = 1):
    """``num_devices``: every device of the run (all processes); ``global_batch``: images per
    update."""
    self._devices = num_devices
    self._global_batch = global_batch
    self._accum_steps = max(accum_steps, 1)
    chip = chips.chip_of_kind(device_kind)
    self._peak_tflops = None if chip is None else chip.bf16_tflops
    self.compile_s = 0.0  # compiling, over the run so far: not in any window
    self.eval_s = 0.0  # evaluating, likewise
    if self._peak_tflops is None:
      logging.info(
        "device kind %r has no bf16 peak in conddetr_jax/hardware/chips.py: MFU is not reported",
        device_kind,
      )

  def window(
    self, steps: int, wall_s: float, input_wait_s: float, flops_per_device: float | None
  ) -> dict[str, Any]:
    """The scalars of a window of ``steps`` updates taking ``wall_s`` seconds (compile and
    evaluation excluded), ``input_wait_s`` of them waiting for batches; ``flops_per_device``: the
    window's FLOPs per device as XLA counts them, or None where the backend counts none."""
    wall_s = max(wall_s, 1e-9)
    images_per_s = self._global_batch * steps / wall_s
    scalars = {
      "images_per_s": images_per_s,
      "images_per_s_per_device": images_per_s / self._devices,
      "step_s": wall_s / steps,
      "step_s_without_input": max(wall_s - input_wait_s, 0.0) / steps,
      "input_wait_share": min(input_wait_s / wall_s, 1.0),
      "compile_s": self.compile_s,
      "eval_s": self.eval_s,
    }
    if flops_per_device:
      tflops = flops_per_device * self._accum_steps / wall_s / 1e12
      scalars["tflops_per_device"] = tflops
      if self._peak_tflops:
        scalars["mfu"] = tflops / self._peak_tflops
    return scalars


class StepProfiler:
  """A ``jax.profiler`` trace of ``num_steps`` training steps, for TensorBoard's profile plugin.

  The trace starts after the run's first step (which compiles) and is written under ``logdir``
  (``plugins/profile/<run>/``, where the plugin looks); the loop marks each step with
  ``jax.profiler.StepTraceAnnotation``, so the plugin's step view splits the trace by step.
  """

  def __init__(self, logdir: str, num_steps: int, first_step: int, enabled: bool = True):
    """``first_step``: the run's first step (this process's, after any resume): it is not traced."""
    self._logdir = logdir
    self._start = first_step + 1 if enabled and num_steps > 0 else None
    self._stop = None if self._start is None else self._start + num_steps - 1
    self._tracing = False

  def before_step(self, step: int) -> None:
    """Starts the trace before the first traced step."""
    if step == self._start:
      jax.profiler.start_trace(self._logdir)
      self._tracing = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Stops the trace once the last traced step's ``outputs`` are computed."""
    if self._tracing and step == self._stop:
      self.close(outputs)

  def close(self, outputs: Any = None) -> None:
    """Stops a trace still running (a run shorter than its traced steps), after ``outputs``."""
    if not self._tracing:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self._tracing = False
    logging.info(
      "profiled steps %d-%d: open %s with TensorBoard's profile tab",
      self._start,
      self._stop,
      self._logdir,
    )
