"""Forward-pass time of Conditional DETR (inference, train=False) in float32 and bfloat16.

Usage: python benchmarks/model_forward.py [--config=configs/r50.py] [--batch=2] [--size=800x1216]
       [--iters=5] [--dtypes=float32,bfloat16]
Prints one line per dtype: seconds per forward (median after warm-up) and images/s.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conddetr_jax import models  # pylint: disable=g-import-not-at-top


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/r50.py")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", default="800x1216", help="HxW of the padded batch")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args()
  h, w = map(int, args.size.split("x"))
  print(
    f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} batch={args.batch} "
    f"size={h}x{w}"
  )
  images = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, h, w, 3)), jnp.float32)
  pad_mask = jnp.zeros((args.batch, h, w), bool)
  for dtype in args.dtypes.split(","):
    config = load_config(args.config)
    config.model.dtype = dtype
    model = models.build_model(config)
    variables = jax.jit(model.init)(
      jax.random.PRNGKey(0), images[:1, :64, :64], pad_mask[:1, :64, :64]
    )
    forward = jax.jit(lambda v, x, m: model.apply(v, x, m)["pred_boxes"])
    t0 = time.perf_counter()
    forward(variables, images, pad_mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      forward(variables, images, pad_mask).block_until_ready()
      times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(
      f"{config.model.backbone} dc5={config.model.dilation} dtype={dtype}: forward_s={step:.4f} "
      f"images_per_s={args.batch / step:.2f} (first call incl. compile {compile_s:.1f}s)"
    )


if __name__ == "__main__":
  main()
