"""Time of one complete train step: forward, matching, loss, backward, clipping, AdamW update.

Usage:
  python benchmarks/train_step.py --config=configs/r50.py --batch=2 --size=384x512
      [--steps=5] [--warmup=2] [--bucket=800x1216] [--bucket_dtypes=float32,bfloat16]
      [--hf=auto|yes|no] [--config.X=...]

Prints, in order: the machine; the step at --size (median after warm-up, compile time, XLA
buffer sizes); images/s and memory at a COCO training bucket (--bucket, '' to skip) in each of
--bucket_dtypes; Hugging Face's ConditionalDetr train step (PyTorch) on the same input and the
ratio (--hf=auto: on CPU only). With the HF step, the two alternate step by step (one JAX step, one
PyTorch step, ...), so that on a shared machine both see the same load and the ratio stays fair.
The last line is ``step_s=<median seconds>`` of the --size step.
Each image gets 7 random boxes (COCO's mean) in max_boxes padded slots, as the pipeline pads them.

With --variant (repeatable; comma-separated config overrides), it instead times the config and
each variant at --size round-robin, one step of each in turn for --rounds rounds, so that on a
shared or loaded machine every variant sees the same load and the ratios stay meaningful:
  python benchmarks/train_step.py --config=configs/demo.py --batch=4 --size=160x192 \
      --variant=model.num_groups=5 --variant=model.dilation=True,model.num_groups=5
"""

import ast
import os
import statistics
import sys
import time
from typing import Any

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.hf_step import build_hf_step
from benchmarks.synthetic import synthetic_batch
from conddetr_jax import cli, models, sharding
from conddetr_jax.training import optimizer, parallel
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model/optimiser config.")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch size.")
_SIZE = flags.DEFINE_string("size", "384x512", "HxW of the padded batch for the step_s figure.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.")
_BUCKET = flags.DEFINE_string(
  "bucket", "800x1216", "A COCO training bucket HxW for images/s; '' skips it."
)
_BUCKET_DTYPES = flags.DEFINE_list(
  "bucket_dtypes", ["float32", "bfloat16"], "Compute dtypes at --bucket."
)
_HF = flags.DEFINE_enum(
  "hf", "auto", ["auto", "yes", "no"], "Time HF's PyTorch train step (auto: on CPU)."
)
_VARIANTS = flags.DEFINE_multi_string(
  "variant",
  [],
  "Config overrides 'a.b=value,c=value' to time against the "
  "config, round-robin (values are Python literals).",
)
_ROUNDS = flags.DEFINE_integer(
  "rounds", 8, "With --variant: timed rounds, after one warm-up round."
)


def _timed(fn, steps: int, warmup: int) -> float:
  """Median seconds of ``steps`` calls of ``fn()`` (which must block) after ``warmup`` untimed
  ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def compile_jax_step(config, batch: dict[str, np.ndarray]) -> tuple[Any, float, Any]:
  """The train step of ``config`` compiled for ``batch`` on all devices: (``run()``, which takes one
  step and blocks, compile seconds, the compiled step: its memory and cost analyses)."""
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  tx = optimizer.build_optimizer(
    config, variables["params"], optimizer.learning_rate_schedule(config, 1000)
  )
  step_fn = lambda state, b: step_lib.train_step(state, b, model=model, tx=tx, config=config)
  par = parallel.JitParallel(step_fn, sharding.make_mesh())
  holder = {
    "state": par.device_state(
      state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config))
    )
  }
  device_batch = jax.device_put(batch, par.batch_sharding)
  t0 = time.perf_counter()
  compiled = par.lower(holder["state"], device_batch).compile()
  compile_s = time.perf_counter() - t0

  def run():
    holder["state"], metrics = par.step(holder["state"], device_batch)
    metrics["loss"].block_until_ready()

  return run, compile_s, compiled


def time_jax_step(
  config, batch: dict[str, np.ndarray], steps: int, warmup: int, other_step: Any = None
) -> tuple[dict[str, float], float | None]:
  """Median step time, compile time and the compiled step's buffer sizes, on all devices; with
  ``other_step`` (a blocking ``run()``, e.g. ``build_hf_step``'s), also its median seconds, the two
  alternating step by step (else None)."""
  run, compile_s, compiled = compile_jax_step(config, batch)
  memory = compiled.memory_analysis()
  if other_step is None:
    step_s, other_s = _timed(run, steps, warmup), None
  else:
    step_s, other_s = timed_alternating([run, other_step], steps, warmup)
  out = {"step_s": step_s, "compile_s": compile_s}
  if memory is not None:
    out["temp_bytes"] = memory.temp_size_in_bytes
    out["state_bytes"] = memory.argument_size_in_bytes - sum(v.nbytes for v in batch.values())
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = stats["peak_bytes_in_use"]
  return out, other_s


def timed_alternating(fns: list, steps: int, warmup: int) -> list[float]:
  """Median seconds of each of ``fns`` (which must block), called in turn: ``warmup`` untimed
  rounds, then ``steps`` timed ones."""
  times = [[] for _ in fns]
  for round_index in range(warmup + steps):
    for fn, record in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      if round_index >= warmup:
        record.append(time.perf_counter() - t0)
  return [statistics.median(record) for record in times]


def with_overrides(config, text: str):
  """A copy of ``config`` with the ``a.b=value,c=value`` fields of ``text`` set (values parsed as
  Python literals, else kept as strings)."""
  config = config.copy_and_resolve_references()
  for item in filter(None, text.split(",")):
    key, value = item.split("=", 1)
    *path, field = key.split(".")
    node = config
    for part in path:
      node = node[part]
    try:
      node[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[field] = value
  return config


def time_variants_round_robin(
  config, variants: list[str], batch: dict[str, np.ndarray], rounds: int
) -> list[list[float]]:
  """Step seconds of ``config`` and of each variant, one step of each in turn per round, after one
  untimed round: ``[config's times, variant 1's times, ...]``."""
  runs = [compile_jax_step(with_overrides(config, v), batch)[0] for v in [""] + variants]
  times = [[] for _ in runs]
  for round_index in range(rounds + 1):
    for run, record in zip(runs, times):
      t0 = time.perf_counter()
      run()
      if round_index:
        record.append(time.perf_counter() - t0)
  return times


def _hw(text: str) -> tuple[int, int]:
  h, w = text.split("x")
  return int(h), int(w)


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  h, w = _hw(_SIZE.value)
  print(
    f"device={jax.devices()[0].device_kind} x{jax.device_count()} backend={jax.default_backend()} "
    f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.1f} backbone={config.model.backbone} "
    f"dtype={config.model.dtype} batch={_BATCH.value}",
    flush=True,
  )
  batch = synthetic_batch(
    _BATCH.value, h, w, config.dataset.max_boxes, num_classes=config.model.num_classes
  )
  if _VARIANTS.value:
    times = time_variants_round_robin(config, _VARIANTS.value, batch, _ROUNDS.value)
    base = statistics.median(times[0])
    for name, record in zip(["(config)"] + _VARIANTS.value, times):
      median = statistics.median(record)
      print(
        f"jax {h}x{w} {name}: step {median:.3f}s (range {min(record):.3f}-{max(record):.3f}s over "
        f"{len(record)} rounds), {median / base:.2f}x the config's",
        flush=True,
      )
    print(f"loadavg={os.getloadavg()[0]:.1f} after the rounds")
    return
  with_hf = _HF.value == "yes" or (_HF.value == "auto" and jax.default_backend() == "cpu")
  main_step, hf_s = time_jax_step(
    config, batch, _STEPS.value, _WARMUP.value, build_hf_step(config, batch) if with_hf else None
  )
  print(
    f"jax {h}x{w}: step {main_step['step_s']:.3f}s, {_BATCH.value / main_step['step_s']:.2f} "
    f"images/s (compile {main_step['compile_s']:.1f}s); XLA temp buffers "
    f"{main_step.get('temp_bytes', 0) / _BATCH.value / 2**20:.0f} MiB/image, state "
    f"{main_step.get('state_bytes', 0) / 2**20:.0f} MiB",
    flush=True,
  )

  if _BUCKET.value:
    bh, bw = _hw(_BUCKET.value)
    bucket_batch = synthetic_batch(
      _BATCH.value, bh, bw, config.dataset.max_boxes, num_classes=config.model.num_classes
    )
    for dtype in _BUCKET_DTYPES.value:
      bucket_config = config.copy_and_resolve_references()
      bucket_config.model.dtype = dtype
      r, _ = time_jax_step(bucket_config, bucket_batch, max(1, _STEPS.value // 2), 1)
      peak = (
        f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB"
        if "device_peak_bytes" in r
        else ""
      )
      print(
        f"jax {bh}x{bw} {dtype}: {_BATCH.value / r['step_s']:.2f} images/s (step "
        f"{r['step_s']:.3f}s); XLA temp buffers "
        f"{r.get('temp_bytes', 0) / _BATCH.value / 2**30:.2f} GiB/image{peak}",
        flush=True,
      )

  if with_hf:
    print(
      f"hf-torch {h}x{w}: step {hf_s:.3f}s, {_BATCH.value / hf_s:.2f} images/s; "
      f"jax/hf speed ratio {hf_s / main_step['step_s']:.2f}x (steps alternated)",
      flush=True,
    )

  print(f"step_s={main_step['step_s']:.4f}")


if __name__ == "__main__":
  cli.run(main)
