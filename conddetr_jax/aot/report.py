"""The aot tool's report: for each size, the train step's and evaluation program's memory against
the chip's, their FLOPs per image, and one summary line for scripts."""

import re
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from conddetr_jax import data
from conddetr_jax.aot import devices as devices_lib
from conddetr_jax.aot import hlo, interconnect, roofline, stages
from conddetr_jax.aot.compiling import (
  GIB,
  Compiled,
  DoesNotFitError,
  SliceCompiler,
  gib,
  search_max_batch,
)
from conddetr_jax.data import batching
from conddetr_jax.hardware import chips
from conddetr_jax.training import loop, parallel

# The original's largest training input (shorter side 800, longer side at most 1333: 800x1216 for
# the common 3:2 images before rounding up to the bucket multiple).
ORIGINAL_LARGEST_SIZE = (800, 1216)


def parse_size(text: str) -> tuple[int, int]:
  """'800x1216' -> (800, 1216); ValueError naming the flag otherwise."""
  m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
  if m is None or int(m[1]) < 1 or int(m[2]) < 1:
    raise ValueError(f"--size={text!r}: expected HxW, e.g. 800x1216")
  return int(m[1]), int(m[2])


def _names_dataset(config: ml_collections.ConfigDict) -> bool:
  ds = config.dataset
  return (
    bool(ds.buckets) or ds.source in ("synthetic", "tfds") or bool(ds.root) or bool(ds.train_ann)
  )


def default_sizes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
  """The config's size buckets when it names a dataset (explicit ``dataset.buckets`` or the data's
  own), else the original's largest training size rounded up to ``size_divisibility``."""
  if _names_dataset(config):
    if not config.dataset.buckets:
      data.prepare_dataset(config)
    return [tuple(int(v) for v in b) for b in data.buckets(config)]
  return [
    tuple(
      int(v)
      for v in batching.round_up(np.array(ORIGINAL_LARGEST_SIZE), config.dataset.size_divisibility)
    )
  ]


def estimated_images_per_s(
  chip: chips.Chip | None, flops_per_image: float, utilization: float
) -> float | None:
  """ESTIMATE: images/s per chip if the step's FLOPs ran at ``utilization`` of the bf16 peak."""
  if chip is None or chip.bf16_tflops is None or flops_per_image <= 0:
    return None
  return chip.bf16_tflops * 1e12 * utilization / flops_per_image


def describe(c: Compiled, capacity_gib: float | None, what: str) -> list[str]:
  """Table rows for one compiled program."""
  fits = (
    "unknown (chip capacity unknown)"
    if capacity_gib is None
    else ("yes" if c.peak_bytes <= capacity_gib * GIB else "NO")
  )
  cap = "unknown" if capacity_gib is None else f"{capacity_gib:g}"
  rows = [
    f"  {what}: compile {c.seconds:.1f} s; per device: arguments {gib(c.argument_bytes)} GiB, "
    f"temporaries {gib(c.temp_bytes)} GiB, outputs {gib(c.output_bytes)} GiB (aliased to arguments "
    f"{gib(c.alias_bytes)}), code {gib(c.code_bytes)}; peak {gib(c.peak_bytes)} GiB of {cap} GiB: "
    f"fits {fits}"
  ]
  if c.collectives:
    parts = [
      f"{op} x{v['count']} {v['bytes'] / 2**20:.1f} MiB ("
      + ", ".join(
        f"{t} {b / 2**20:.1f}"
        for t, b in sorted(v["bytes_by_dtype"].items(), key=lambda kv: -kv[1])
      )
      + ")"
      for op, v in sorted(c.collectives.items())
    ]
    rows.append(
      f"    collectives per device (static count, result bytes by element type): {', '.join(parts)}"
    )
  else:
    rows.append("    collectives: none")
  return rows


def summary_line(
  topology: str,
  devices: int,
  fits: bool,
  peak_gib: float,
  capacity_gib: float | None,
  train_gflop_per_image: float,
  eval_gmac_per_image: float | None,
  train_gb_per_image: float | None = None,
  roofline_images_per_s_per_chip: float | None = None,
) -> str:
  """``aot topology=... devices=... fits=... hbm_gib=... hbm_capacity_gib=...
  train_gflop_per_image=... eval_gmac_per_image=... train_gb_per_image=...
  roofline_images_per_s_per_chip=...`` ('unknown' where a figure is)."""
  unknown_or = lambda v, fmt: "unknown" if v is None else format(v, fmt)
  ev = "skipped" if eval_gmac_per_image is None else f"{eval_gmac_per_image:.1f}"
  return (
    f"aot topology={topology} devices={devices} fits={'yes' if fits else 'no'} "
    f"hbm_gib={peak_gib:.2f} hbm_capacity_gib={unknown_or(capacity_gib, 'g')} "
    f"train_gflop_per_image={train_gflop_per_image:.1f} eval_gmac_per_image={ev} "
    f"train_gb_per_image={unknown_or(train_gb_per_image, '.2f')} "
    f"roofline_images_per_s_per_chip={unknown_or(roofline_images_per_s_per_chip, '.1f')}"
  )


def _step_cost(
  train: Compiled,
  compiler: SliceCompiler,
  batch: int,
  hw: tuple[int, int],
  chip: chips.Chip | None,
  per_chip: int,
  with_stages: bool | None,
  out: Callable[[str], None],
) -> stages.StageCost | None:
  """Prints the step's bytes, its roofline on each chip, its loops and (``with_stages``) the
  per-stage table; returns the step's cost, None where the compiler counts no bytes (a GPU)."""
  step = stages.cost_of(train.executable)
  if step.bytes_accessed <= 0:
    out(
      "    bytes accessed, roofline, stages: not available: this target's compiler gives no cost "
      "analysis"
    )
    return None
  out(
    f"    train: {step.bytes_accessed / batch / 1e9:.2f} GB accessed per image per step "
    f"(XLA's count, after fusion), {step.flops_per_byte:.1f} FLOP per byte"
  )
  out("\n".join(roofline.chip_rows(step, batch, None if chip is None else chip.name)))
  out("\n".join(roofline.loop_rows(hlo.while_loops(train.executable.as_text()))))
  if with_stages is False:
    return step
  t0 = time.perf_counter()
  table = stages.stage_table(compiler, batch, hw, step)
  out("\n".join(roofline.stage_rows(table, chip, per_chip, batch)))
  out(
    f"    stages: {len(table.stages)} programs compiled in {time.perf_counter() - t0:.0f} s; "
    "'rest' = the whole step minus the stages (matching excluded: it runs inside the criterion); "
    "what it holds: docs/accelerators.md"
  )
  return step


def run(
  config: ml_collections.ConfigDict,
  topology: str,
  sizes: Sequence[tuple[int, int]],
  *,
  max_batch: bool = False,
  with_eval: bool = True,
  with_stages: bool | None = None,
  out: Callable[[str], None] = print,
) -> str:
  """Compiles and reports for each size; returns the summary line (of the first size), also printed
  last.

  ``with_stages``: also compile each stage of the train step alone for its cost table
  (``aot.stages``); None: where the compiler counts bytes (TPUs, not GPUs).

  Raises:
    CompilerMissingError, ValueError: no TPU or GPU compiler, an unknown topology, or a bad config.
    GpuCompileError: a GPU compile failed for a reason other than memory.
  """
  devices = devices_lib.devices_of(topology)
  chip = devices_lib.chip_of(devices[0])
  per_chip = devices_lib.devices_per_chip(devices)
  capacity = None if chip is None else chip.hbm_gib / per_chip
  processes = len({d.process_index for d in devices})
  # The question asked is whether per_device_batch_size images per device fit, whatever global batch
  # a training run of the config keeps (training/batch.py accumulates micro-batches of at most that
  # many): the step is compiled for exactly that many, without accumulation, which adds only one
  # gradient-sized buffer.
  config = config.copy_and_resolve_references()
  config.global_batch_size, config.grad_accum_steps = 0, 1
  loop.validate_config(config, len(devices))
  batch = config.per_device_batch_size
  m = config.model
  out(
    f"topology {topology}: {len(devices)} devices ({devices[0].device_kind}, {per_chip} per chip) "
    f"over {processes} host(s); chip: "
    + (
      "unknown to this tool: HBM capacity and peak not known"
      if chip is None
      else f"{chip.name}, {chip.hbm_gib:g} GiB HBM, "
      + (
        "no bf16 tensor cores" if chip.bf16_tflops is None else f"{chip.bf16_tflops:g} bf16 TFLOP/s"
      )
    )
  )
  compiler = SliceCompiler(config, devices)  # the jit strategy, whatever config.parallel says
  state_layout = "split over 'data'" if parallel.splits_state(compiler.config) else "replicated"
  out(
    f"model {m.backbone}{' DC5' if m.dilation else ''} dtype={m.dtype}; train: {batch} images per "
    f"device (global {batch * len(devices)}), state {state_layout}, batch split over 'data'; eval: "
    f"{config.eval_per_device_batch_size} images per device"
  )
  if compiler.gpu:
    out(
      "FLOPs are the project's counter (conddetr_jax/hardware/flops.py: 2 x the multiply-adds of "
      "convolutions and matrix products only; the GPU compiler gives no cost analysis); GMAC = "
      "GFLOP / 2."
    )
    out(
      "Memory is XLA's buffer assignment without a GPU, so without autotuning: every matrix "
      "product a cuBLAS call (xla_gpu_enable_triton_gemm=false) and cuDNN convolutions without "
      "scratch space; a GPU's autotuned program may choose Triton fusions and convolution "
      "algorithms with workspace. JAX itself takes 75% of a GPU's memory unless "
      "XLA_PYTHON_CLIENT_MEM_FRACTION says more."
    )
  else:
    out("FLOPs are XLA's (a multiply-add counts 2; elementwise ops count too); GMAC = GFLOP / 2.")
  summary = None
  for hw in sizes:
    out(f"size {hw[0]}x{hw[1]}:")
    refusal = None
    try:
      train = compiler.train(batch, hw)
    except DoesNotFitError as e:
      train, refusal = None, e
      out(
        f"  train step ({batch}/device): does NOT fit{e.describe_need()}: "
        f"{str(e).splitlines()[0][:300]}"
      )
    except Exception as e:  # pylint: disable=broad-except
      if processes > 1:
        raise RuntimeError(
          f"--topology={topology} spans {processes} hosts and JAX could not compile it from one "
          f"process ({type(e).__name__}: {e}); try one host, such as v5e:2x2 or h100:8"
        ) from e
      raise
    gflop = float("nan")
    step_cost = None
    if train is not None:
      out("\n".join(describe(train, capacity, f"train step ({batch}/device)")))
      flops_per_image = (
        2 * compiler.train_macs_per_image(batch, hw) if compiler.gpu else train.flops / batch
      )
      gflop = flops_per_image / 1e9
      est = [estimated_images_per_s(chip, flops_per_image, u) for u in (1.0, 0.4)]
      out(
        f"    train: {gflop:.1f} GFLOP per image per step"
        + (
          ""
          if est[0] is None
          else f"; ESTIMATE (not a measurement) {est[0]:.1f} images/s per "
          f"chip at 100% of bf16 peak, {est[1]:.1f} at 40%"
        )
      )
      out(
        interconnect.estimate_row(
          train.collectives,
          len(devices),
          per_chip,
          chip,
          flops_per_image * batch,
          processes,
          compiler.gpu,
        )
      )
      step_cost = _step_cost(train, compiler, batch, hw, chip, per_chip, with_stages, out)
    gmac = None
    if with_eval:
      ev = compiler.eval(config.eval_per_device_batch_size, hw)
      out(
        "\n".join(
          describe(
            ev, capacity, f"eval forward+postprocess ({config.eval_per_device_batch_size}/device)"
          )
        )
      )
      gmac = (
        compiler.eval_macs_per_image(config.eval_per_device_batch_size, hw)
        if compiler.gpu
        else ev.flops / 2 / config.eval_per_device_batch_size
      ) / 1e9
      out(f"    eval: {gmac:.1f} GMAC ({2 * gmac:.1f} GFLOP) per image")
    if max_batch and capacity is not None:
      search_max_batch(compiler, hw, batch, train or refusal, capacity, out)
    elif max_batch:
      out("    max_batch: skipped, the chip's capacity is unknown")
    if summary is None:
      fits_train = train is not None and capacity is not None and train.peak_bytes <= capacity * GIB
      peak_bytes = train.peak_bytes if train is not None else (refusal.needed_bytes or float("nan"))
      summary = summary_line(
        topology,
        len(devices),
        fits_train,
        peak_bytes / GIB,
        capacity,
        gflop,
        gmac,
        None if step_cost is None else step_cost.bytes_accessed / batch / 1e9,
        None if step_cost is None else roofline.images_per_s_per_chip(step_cost, chip, batch),
      )
  out(summary)
  return summary
