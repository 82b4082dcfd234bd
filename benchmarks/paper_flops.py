"""Our forward's multiply-adds per image against the paper's FLOPs column (multiply-add = 1).

Usage:
  python benchmarks/paper_flops.py [--configs=r50,r50_dc5,r101,r101_dc5]
      [--sizes=800x1216,800x1067,800x1199]

The original's README: Conditional DETR-R50 90 G, DC5-R50 195 G, R101 156 G, DC5-R101 262 G, by
DETR's counter (convolutions and matrix products only, one multiply-add = one FLOP) averaged
over the first 100 COCO val2017 images at batch 1 (no padding). ``conddetr_jax.hardware.flops.macs``
applies that rule to our evaluation forward's jaxpr (shapes only: nothing compiles). Sizes are of
single unpadded images: 800x1067 is a 640x480 image resized as in evaluation, 800x1199 a 640x427.
Prints one row per config and size, then ``paper_flops max_abs_gap_pct=<x>``.
"""

import importlib
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from conddetr_jax import models
from conddetr_jax.hardware import flops

PAPER_GMACS = {"r50": 90, "r50_dc5": 195, "r101": 156, "r101_dc5": 262}

_CONFIGS = flags.DEFINE_list("configs", list(PAPER_GMACS), "Config modules under configs/.")
_SIZES = flags.DEFINE_list(
  "sizes", ["800x1216", "800x1067", "800x1199"], "HxW of one unpadded image."
)


def forward_macs(config_name: str, h: int, w: int) -> dict[str, int]:
  """Multiply-adds of one image's evaluation forward (``model.apply(..., train=False)``)."""
  config = importlib.import_module(f"configs.{config_name}").get_config()
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0), abstract=True)
  image = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  pad_mask = jax.ShapeDtypeStruct((1, h, w), jnp.bool_)
  return flops.macs(lambda v, x, m: model.apply(v, x, m, train=False), variables, image, pad_mask)


def main(argv: list[str]) -> None:
  del argv
  print(
    f"{'config':10s} {'size':>9s} {'conv GMAC':>10s} {'matmul GMAC':>12s} {'total GMAC':>11s} "
    f"{'paper G':>8s} {'ratio':>6s}",
    flush=True,
  )
  gaps = []
  for name in _CONFIGS.value:
    for size in _SIZES.value:
      h, w = (int(v) for v in size.split("x"))
      r = forward_macs(name, h, w)
      paper = PAPER_GMACS.get(name)
      ratio = r["total"] / 1e9 / paper if paper else float("nan")
      if paper:
        gaps.append(abs(ratio - 1) * 100)
      print(
        f"{name:10s} {size:>9s} {r['conv'] / 1e9:10.1f} {r['dot'] / 1e9:12.1f} "
        f"{r['total'] / 1e9:11.1f} {paper or float('nan'):8.0f} {ratio:6.3f}",
        flush=True,
      )
  print(f"paper_flops max_abs_gap_pct={max(gaps) if gaps else float('nan'):.1f}")


if __name__ == "__main__":
  app.run(main)
