"""One call on a lent GPU/TPU: train-step images/s, MFU, the matcher's share, eval images/s, memory.

Usage (on the machine with the accelerator; all devices JAX sees are used, data parallel):
  python benchmarks/accelerator.py [--config=configs/r50.py] [--sizes=800x1216]
      [--dtypes=bfloat16,float32] [--batches=2,4,8] [--steps=5] [--budget_s=300]
      [--out=accelerator.json]
  python benchmarks/accelerator.py --tiny  # CPU smoke run: configs/test_tiny.py, 64x64,
                                           # a few minutes
      [--hf=yes]                            # ... with the PyTorch side too, on the CPU

For each size, dtype and per-device batch (the sweep stops growing a batch at the first failure,
e.g. out of memory): the train step (training.loop.build_train_step, as train.py runs it) is
compiled, its median step time measured, and MFU = the compiled program's FLOPs (XLA's
cost_analysis, per device; a multiply-add is 2) / step time / the device's dense bf16 peak (the
``hardware.chips`` table; float32 runs are held against the same bf16 peak; unknown devices: no
MFU); beside it the roofline of the same compiled step on that device (images/s if it ran at
max(FLOPs / bf16 peak, bytes accessed / HBM bandwidth), XLA's counts per device: a bound, not a
time; none where the backend's cost analysis counts no bytes or the chip is unknown, said once) and
the measured share of it. Then, per size and dtype, the evaluation program (forward +
post-processing) at the largest batch that ran; and per batch the Hungarian matching alone under jit
on the step's shapes (decoder layers x batch x queries x classes, ``max_boxes`` slots with 7 boxes
each), for both solvers, as a share of the step. With ``--hf`` (default: on a GPU), per size and
dtype, Hugging Face transformers' PyTorch Conditional DETR train step
(``benchmarks/hf_step.build_hf_step``: the same sizes, trainable set and optimizer; HF's own ResNet,
no DC5) on one device at ``--hf_batch`` images, bfloat16 as ``torch.autocast`` and float32 with TF32
allowed (as XLA's default precision allows it on a GPU), and the ratio of JAX's images/s per device
to PyTorch's. New configurations are not started once ``--budget_s`` has passed (the default leaves
the 8-minute window of a lent device room for start-up). Writes one JSON file and prints a table;
the last line is ``accelerator best_images_per_s=<x> best_mfu_pct=<y>
roofline_images_per_s_at_best=<z> ...`` (with ``jax_over_hf=<ratio per dtype>`` when timed).
"""

import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.hf_step import build_hf_step
from benchmarks.synthetic import synthetic_batch
from conddetr_jax import models, sharding
from conddetr_jax.aot import compiling, stages
from conddetr_jax.aot import report as aot_report
from conddetr_jax.criterion import matching
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.hardware import chips
from conddetr_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model config.")
_TINY = flags.DEFINE_bool(
  "tiny",
  False,
  "CPU smoke run: configs/test_tiny.py with the whole ResNet-18, at 64x64, batches 1,2, 2 steps.",
)
_SIZES = flags.DEFINE_list("sizes", ["800x1216"], "HxW padded batch shapes (size buckets).")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Compute dtypes.")
_BATCHES = flags.DEFINE_list("batches", ["2", "4", "8"], "Per-device batch sweep (ascending).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per configuration (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_BUDGET = flags.DEFINE_float(
  "budget_s", 300.0, "Start no new configuration after this many seconds."
)
_OUT = flags.DEFINE_string("out", "accelerator.json", "Where the JSON results go.")
_HF = flags.DEFINE_enum(
  "hf", "auto", ["auto", "yes", "no"], "Also time HF's PyTorch train step (auto: on a GPU)."
)
_HF_BATCH = flags.DEFINE_integer(
  "hf_batch",
  2,
  "Images per step for the PyTorch side (one device), and the JAX "
  "per-device batch it is compared with (the original's recipe: 2 per GPU).",
)


def peak_tflops(device: Any) -> float | None:
  """The device's dense bf16 peak (``hardware.chips``), or None for a kind it does not know."""
  chip = chips.chip_of_kind(device.device_kind)
  return None if chip is None else chip.bf16_tflops


def _median_seconds(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class Bench:
  """One model at one size and dtype on all devices."""

  config: Any
  mesh: Any
  hw: tuple[int, int]
  steps: int
  warmup: int

  def __post_init__(self):
    self.model, _, create, self.par = loop.build_train_step(self.config, 1000, self.mesh)
    variables = models.init_variables(self.model, jax.random.PRNGKey(0))
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    # The state laid out as the step takes it (split over the devices unless config.shard_state
    # is False): the compiled program is called directly, which reshards nothing.
    self._create = jax.jit(create, out_shardings=self.par.state_sharding)

  def train(self, per_device: int) -> dict[str, Any]:
    """Compile seconds, median step seconds, images/s, FLOPs per device and compiled memory."""
    n = per_device * self.mesh.size
    batch = jax.device_put(
      synthetic_batch(n, *self.hw, self.config.dataset.max_boxes), self.par.batch_sharding
    )
    state = self._create(self.variables)
    compiled = compiling.compile_lowered(lambda: self.par.lower(state, batch))
    holder = {"state": state}

    def step():  # the compiled program itself: calling par.step would compile it a second time
      holder["state"], metrics = compiled.executable(holder["state"], batch)
      return metrics["loss"]

    step_s = _median_seconds(step, self.steps, self.warmup)
    cost = stages.cost_of(compiled.executable)
    chip = chips.chip_of_kind(jax.devices()[0].device_kind)
    # One device per chip (every chip of the table): the device's program at the chip's roofline.
    roofline_s = cost.roofline_s(chip) if chip is not None and cost.bytes_accessed > 0 else None
    return {
      "per_device_batch": per_device,
      "compile_s": compiled.seconds,
      "step_s": step_s,
      "images_per_s": n / step_s,
      "flops_per_device": compiled.flops,
      "bytes_accessed_per_device": cost.bytes_accessed or None,
      "roofline_step_s": roofline_s,
      "roofline_images_per_s": n / roofline_s if roofline_s else None,
      "compiled_peak_bytes": compiled.peak_bytes,
      "collectives": compiled.collectives,
      "device_peak_bytes_so_far": _device_peak_bytes(),
    }

  def eval(self, per_device: int) -> dict[str, Any]:
    """Evaluation (forward + post-processing) images/s at ``per_device`` images per device."""
    n = per_device * self.mesh.size
    host = synthetic_batch(n, *self.hw, self.config.dataset.max_boxes)
    batch = jax.device_put(
      {
        "image": host["image"],
        "pad_mask": host["pad_mask"],
        "orig_size": np.tile(np.array([self.hw], np.int32), (n, 1)),
      },
      sharding.batch_sharding(self.mesh),
    )
    fn = functools.partial(
      coco_eval.predict_batch,
      self.variables,
      batch,
      model=self.model,
      k=coco_eval.top_k(self.config),
    )
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first_s = time.perf_counter() - t0
    s = _median_seconds(fn, self.steps, 0)
    return {
      "per_device_batch": per_device,
      "first_call_s": first_s,
      "batch_s": s,
      "images_per_s": n / s,
    }


def matcher_seconds(config: Any, global_batch: int, solver: str, steps: int) -> float:
  """Median seconds of ``matching.match`` alone under jit on a train step's shapes (all decoder
  layers)."""
  m = config.model
  rng = np.random.default_rng(0)
  layers = m.dec_layers if m.aux_loss else 1
  host = synthetic_batch(global_batch, 8, 8, config.dataset.max_boxes)
  logits = rng.normal(size=(layers, global_batch, m.num_queries, m.num_classes)).astype(np.float32)
  boxes = rng.uniform(0.1, 0.9, (layers, global_batch, m.num_queries, 4)).astype(np.float32)
  matcher_config = config.matcher.copy_and_resolve_references()
  matcher_config.solver = solver
  fn = jax.jit(lambda *a: matching.match(*a, matcher_config).target_index)
  targets = matching.Targets(host["boxes"], host["labels"] % m.num_classes, host["box_valid"])
  args = jax.tree.map(jnp.asarray, (logits, boxes, targets))
  return _median_seconds(lambda: fn(*args), steps, 1)


def hf_train(
  config: Any, hw: tuple[int, int], batch: int, steps: int, warmup: int
) -> dict[str, Any]:
  """HF's PyTorch train step of ``config`` (its ``model.dtype`` picks autocast bf16 or float32) on
  one device: PyTorch's CUDA device where JAX runs on a GPU, else the CPU. Median seconds and
  images/s."""
  import torch  # pylint: disable=g-import-not-at-top

  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  if device == "cuda":
    if not torch.cuda.is_available():
      raise RuntimeError(f"torch {torch.__version__} sees no CUDA GPU (a CPU-only build?)")
    # XLA's default precision lets float32 matrix products and convolutions use TF32 on a GPU; so
    # does this.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  host = synthetic_batch(batch, *hw, config.dataset.max_boxes, num_classes=config.model.num_classes)
  t0 = time.perf_counter()
  run = build_hf_step(config, host, device=device, autocast_bf16=config.model.dtype == "bfloat16")
  build_s = time.perf_counter() - t0
  s = _median_seconds(run, steps, warmup)
  return {
    "device": device,
    "batch": batch,
    "build_s": build_s,
    "step_s": s,
    "images_per_s": batch / s,
    "torch": torch.__version__,
    "precision": "autocast bfloat16"
    if config.model.dtype == "bfloat16"
    else "float32 (TF32 allowed)"
    if device == "cuda"
    else "float32",
  }


def _row(*cells: Any) -> str:
  return " ".join(f"{c:>12}" if not isinstance(c, float) else f"{c:12.3f}" for c in cells)


def main(argv: list[str]) -> None:
  del argv
  start = time.perf_counter()
  config = _CONFIG.value
  sizes, batches, steps = _SIZES.value, [int(b) for b in _BATCHES.value], _STEPS.value
  if _TINY.value:
    from configs import test_tiny  # pylint: disable=g-import-not-at-top

    config, sizes, batches, steps = test_tiny.get_config(), ["64x64"], [1, 2], min(steps, 2)
    config.model.backbone_num_stages = 4  # the whole ResNet-18, which HF's model (--hf) can mirror
    if _BATCHES.present:
      batches = [int(b) for b in _BATCHES.value]
  devices = jax.devices()
  peak = peak_tflops(devices[0])
  mesh = sharding.make_mesh(devices)
  report: dict[str, Any] = {
    "device_kind": devices[0].device_kind,
    "devices": len(devices),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "backbone": config.model.backbone,
    "dc5": bool(config.model.dilation),
    "peak_bf16_tflops_per_device": peak,
    "peak_note": "dense bf16 vendor peak; float32 runs are compared with it too"
    if peak
    else "unknown device",
    "train": [],
    "eval": [],
    "matcher": [],
    "hf": [],
    "skipped": [],
  }
  with_hf = _HF.value == "yes" or (_HF.value == "auto" and jax.default_backend() == "gpu")
  print(
    f"device={devices[0].device_kind} x{len(devices)} backend={jax.default_backend()} "
    f"peak_bf16={peak or 'unknown'} TFLOP/s/device config={config.model.backbone}"
    f"{' DC5' if config.model.dilation else ''}",
    flush=True,
  )
  print(
    _row(
      "size",
      "dtype",
      "batch/dev",
      "images/s",
      "step_s",
      "compile_s",
      "MFU%",
      "mem_GiB",
      "roofline_i/s",
      "%_roofline",
    ),
    flush=True,
  )
  print(
    "  roofline_i/s: images/s at the roofline of the compiled step (per device: max(XLA's FLOPs / "
    "bf16 peak, XLA's bytes accessed / HBM bandwidth), a bound, not a time), all devices; "
    "%_roofline: measured over it",
    flush=True,
  )

  def over_budget(what: str) -> bool:
    if time.perf_counter() - start > _BUDGET.value:
      report["skipped"].append(what)
      return True
    return False

  matcher_done: set[int] = set()
  for size in sizes:
    hw = aot_report.parse_size(size)
    for dtype in _DTYPES.value:
      if over_budget(f"{size} {dtype}"):
        continue
      run_config = config.copy_and_resolve_references()
      run_config.model.dtype = dtype
      bench = Bench(run_config, mesh, hw, steps, _WARMUP.value)
      largest = None
      for b in batches:
        if over_budget(f"{size} {dtype} train batch {b}"):
          break
        try:
          r = bench.train(b)
        except Exception as e:  # pylint: disable=broad-except  (out of memory ends the sweep)
          report["train"].append(
            {
              "size": size,
              "dtype": dtype,
              "per_device_batch": b,
              "error": f"{type(e).__name__}: {str(e)[:300]}",
            }
          )
          print(_row(size, dtype, b, "failed", type(e).__name__), flush=True)
          break
        largest = b
        r["mfu"] = r["flops_per_device"] / r["step_s"] / (peak * 1e12) if peak else None
        r["share_of_roofline"] = (
          r["images_per_s"] / r["roofline_images_per_s"] if r["roofline_images_per_s"] else None
        )
        if r["roofline_images_per_s"] is None and "roofline_note" not in report:
          report["roofline_note"] = "no roofline: " + (
            "no bytes accessed in this backend's cost analysis"
            if r["bytes_accessed_per_device"] is None
            else f"no peak or bandwidth known for {devices[0].device_kind!r}"
          )
          print(f"  {report['roofline_note']}", flush=True)
        report["train"].append({"size": size, "dtype": dtype, **r})
        mem = r["compiled_peak_bytes"]
        print(
          _row(
            size,
            dtype,
            b,
            r["images_per_s"],
            r["step_s"],
            r["compile_s"],
            "n/a" if r["mfu"] is None else 100 * r["mfu"],
            "n/a" if mem is None else mem / 2**30,
            "n/a" if r["roofline_images_per_s"] is None else r["roofline_images_per_s"],
            "n/a" if r["share_of_roofline"] is None else 100 * r["share_of_roofline"],
          ),
          flush=True,
        )
        if b not in matcher_done:
          matcher_done.add(b)
          for solver in ("hungarian", "scipy"):
            s = matcher_seconds(run_config, b * len(devices), solver, steps)
            report["matcher"].append(
              {
                "per_device_batch": b,
                "solver": solver,
                "seconds": s,
                "share_of_step": s / r["step_s"],
                "step_of": f"{size} {dtype}",
              }
            )
            print(
              f"    matcher {solver}: {s * 1e3:.1f} ms = {100 * s / r['step_s']:.1f}% of the step",
              flush=True,
            )
      jax_at_hf_batch = next(
        (
          t
          for t in report["train"]
          if t.get("size") == size
          and t.get("dtype") == dtype
          and t["per_device_batch"] == _HF_BATCH.value
          and "error" not in t
        ),
        None,
      )
      if with_hf and not over_budget(f"{size} {dtype} hf"):
        try:
          h = hf_train(run_config, hw, _HF_BATCH.value, steps, _WARMUP.value)
        except Exception as e:  # pylint: disable=broad-except  (no CUDA torch, DC5, out of memory: said, not fatal)
          h = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        h = {"size": size, "dtype": dtype, **h}
        if "error" not in h and jax_at_hf_batch is not None:
          h["jax_images_per_s_per_device"] = jax_at_hf_batch["images_per_s"] / len(devices)
          h["jax_over_hf"] = h["jax_images_per_s_per_device"] / h["images_per_s"]
        report["hf"].append(h)
        print(
          f"    hf-torch {size} {dtype} batch {_HF_BATCH.value} on one "
          f"{h.get('device', 'device')}: "
          + (
            h["error"]
            if "error" in h
            else f"{h['images_per_s']:.2f} images/s ({h['precision']}); JAX/PyTorch per "
            f"device: "
            + (
              f"{h['jax_over_hf']:.2f}x"
              if "jax_over_hf" in h
              else f"n/a (JAX did not run {_HF_BATCH.value}/device)"
            )
          ),
          flush=True,
        )
      if largest is not None and not over_budget(f"{size} {dtype} eval"):
        e = bench.eval(largest)
        report["eval"].append({"size": size, "dtype": dtype, **e})
        print(
          f"    eval {size} {dtype} batch {largest}/device: {e['images_per_s']:.2f} images/s",
          flush=True,
        )
  report["device_peak_bytes"] = _device_peak_bytes()
  report["wall_s"] = time.perf_counter() - start
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1)
  ok = [t for t in report["train"] if "error" not in t]
  best = max(ok, key=lambda t: t["images_per_s"]) if ok else None
  mfus = [t["mfu"] for t in ok if t.get("mfu") is not None]
  print(f"wrote {_OUT.value}; skipped for the time budget: {report['skipped'] or 'nothing'}")
  ratios = "".join(
    f" jax_over_hf_{h['dtype']}={h['jax_over_hf']:.2f}" for h in report["hf"] if "jax_over_hf" in h
  )
  best_roofline = best and best.get("roofline_images_per_s")
  print(
    f"accelerator best_images_per_s={best['images_per_s'] if best else 0:.2f} "
    f"best_mfu_pct={100 * max(mfus) if mfus else float('nan'):.1f} "
    f"roofline_images_per_s_at_best={best_roofline or float('nan'):.2f} "
    f"wall_s={report['wall_s']:.0f}{ratios}"
  )


if __name__ == "__main__":
  app.run(main)
