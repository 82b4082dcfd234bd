"""What masking the padding costs (config.model.mask_padding): masked and unmasked, side by side.

  python benchmarks/mask_cost.py [--config=configs/r50.py] [--size=384x512] [--batch=2]
      [--rounds=5] [--parts=cpu,tpu] [--topology=v5e:2x2] [--tpu_size=800x1216] [--tpu_batch=2]
      [--tpu_dtype=bfloat16]

cpu: on this machine's CPU at --size, the evaluation forward (train=False; mask_padding 'never'
against 'eval') and the train step ('never' against 'always'). The two variants of each run in
turn, one call of each per round, for --rounds rounds after a warm-up round, so that on a shared
machine both see the same load: median seconds, the masked / unmasked ratio, and the ratio of XLA's
cost-analysis FLOPs of the two compiled programs. The batch's last image is padded (its bottom and
right quarter), as a bucketed batch's are.

tpu: the aot tool's train GFLOP per image (``conddetr_jax.aot.report.run`` without the evaluation
program) for --topology at --tpu_size, --tpu_batch images per chip in --tpu_dtype, 'never' then
'always', one compile at a time (each takes minutes and GBs of memory). Needs libtpu (``pip install
"jax[tpu]"``, or its folder on PYTHONPATH).
"""

import argparse
import functools
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.eval_padding import load_config
from benchmarks.synthetic import synthetic_batch
from benchmarks.train_step import compile_jax_step, timed_alternating
from conddetr_jax import models
from conddetr_jax.aot import report
from conddetr_jax.hardware import flops

# (unmasked, masked) settings of config.model.mask_padding for each program.
EVAL_SETTINGS = ("never", "eval")
TRAIN_SETTINGS = ("never", "always")


def _with_mask_padding(config, setting: str):
  config = config.copy_and_resolve_references()
  config.model.mask_padding = setting
  return config


def padded_batch(config, batch: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
  """A synthetic train batch whose last image fills only the top-left 3/4 of each side."""
  out = synthetic_batch(batch, *hw, config.dataset.max_boxes, num_classes=config.model.num_classes)
  h, w = hw
  out["pad_mask"][-1, 3 * h // 4 :, :] = True
  out["pad_mask"][-1, :, 3 * w // 4 :] = True
  out["image"][out["pad_mask"]] = 0.0
  return out


def _flops(compiled: Any) -> float:
  return float(flops.cost_analysis(compiled).get("flops", float("nan")))


def compile_eval_forward(config, batch: dict[str, np.ndarray]) -> tuple[Callable[[], Any], float]:
  """The evaluation forward of ``config`` compiled for ``batch``: (``run()``, which blocks, XLA's
  FLOPs of the program)."""
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  images, pad_mask = jax.device_put(batch["image"]), jax.device_put(batch["pad_mask"])
  forward = jax.jit(functools.partial(model.apply, train=False))
  compiled = forward.lower(variables, images, pad_mask).compile()

  def run():
    jax.block_until_ready(compiled(variables, images, pad_mask))

  return run, _flops(compiled)


def compile_train_step(config, batch: dict[str, np.ndarray]) -> tuple[Callable[[], Any], float]:
  """``compile_eval_forward`` for the train step (benchmarks/train_step.py's)."""
  run, _, compiled = compile_jax_step(config, batch)
  return run, _flops(compiled)


def _load() -> str:
  return f"loadavg {os.getloadavg()[0]:.2f}"


def cpu_part(config, batch: int, hw: tuple[int, int], rounds: int) -> None:
  """Prints the eval forward's and the train step's masked / unmasked time and FLOPs ratios."""
  data = padded_batch(config, batch, hw)
  programs = {
    "eval forward": (
      EVAL_SETTINGS,
      [compile_eval_forward(_with_mask_padding(config, s), data) for s in EVAL_SETTINGS],
    ),
    "train step": (
      TRAIN_SETTINGS,
      [compile_train_step(_with_mask_padding(config, s), data) for s in TRAIN_SETTINGS],
    ),
  }
  for name, (settings, compiled) in programs.items():
    print(f"{name}: {rounds} rounds starting, {_load()}", flush=True)
    seconds = timed_alternating([run for run, _ in compiled], rounds, warmup=1)
    (_, plain_flops), (_, masked_flops) = compiled
    print(
      f"cpu {name} {hw[0]}x{hw[1]} batch {batch}: mask_padding={settings[0]} {seconds[0]:.3f} s, "
      f"={settings[1]} {seconds[1]:.3f} s: time ratio {seconds[1] / seconds[0]:.3f}; XLA FLOPs "
      f"{plain_flops / 1e9:.2f} vs {masked_flops / 1e9:.2f} G: ratio "
      f"{masked_flops / plain_flops:.4f} ({_load()} after)",
      flush=True,
    )


def tpu_train_gflop_per_image(config, topology: str, hw: tuple[int, int]) -> float:
  """The aot tool's ``train_gflop_per_image`` for ``config`` (its own lines printed indented)."""
  summary = report.run(
    config, topology, [hw], with_eval=False, out=lambda line: print("    " + line)
  )
  return float(re.search(r"train_gflop_per_image=(\S+)", summary).group(1))


def tpu_part(config, topology: str, hw: tuple[int, int], batch: int, dtype: str) -> None:
  """Prints the aot tool's train GFLOP/image unmasked and masked, and their ratio."""
  gflop = []
  for setting in TRAIN_SETTINGS:
    c = _with_mask_padding(config, setting)
    c.model.dtype, c.per_device_batch_size = dtype, batch
    t0 = time.perf_counter()
    gflop.append(tpu_train_gflop_per_image(c, topology, hw))
    print(
      f"aot {topology} {hw[0]}x{hw[1]} {batch}/chip {dtype} mask_padding={setting}: train "
      f"{gflop[-1]:.1f} GFLOP/image ({time.perf_counter() - t0:.0f} s, {_load()})",
      flush=True,
    )
  print(f"aot train GFLOP/image ratio masked / unmasked: {gflop[1] / gflop[0]:.4f}", flush=True)


def _hw(text: str) -> tuple[int, int]:
  h, w = text.split("x")
  return int(h), int(w)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/r50.py")
  parser.add_argument("--size", default="384x512")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--parts", default="cpu,tpu")
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--tpu_size", default="800x1216")
  parser.add_argument("--tpu_batch", type=int, default=2)
  parser.add_argument("--tpu_dtype", default="bfloat16")
  args = parser.parse_args()
  config = load_config(args.config)
  m = config.model
  print(
    f"{m.backbone}{' DC5' if m.dilation else ''} {m.dtype}; {jax.device_count()} "
    f"{jax.default_backend()} device(s), {os.cpu_count()} cpus, {_load()}",
    flush=True,
  )
  parts = args.parts.split(",")
  if "cpu" in parts:
    cpu_part(config, args.batch, _hw(args.size), args.rounds)
  if "tpu" in parts:
    tpu_part(config, args.topology, _hw(args.tpu_size), args.tpu_batch, args.tpu_dtype)


if __name__ == "__main__":
  main()
