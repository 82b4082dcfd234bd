"""Times Hungarian matching for one train step: every decoder layer of every image.

    python benchmarks/matching.py [--images 16 --queries 300 --layers 6 --slots 100]

Compares, on the default JAX backend, the full ``matching.match`` call (cost matrix
plus solve, jitted) with the on-device solver and with scipy through a host callback,
and optax's ``hungarian_algorithm`` vmapped over the same cost matrices. Target
counts per image: "coco-like" draws them like COCO train2017 (mean ~7, with one
image at the maximum of 93), "7 each" and "all slots" are the easy and the worst
case. Predictions are random, as at the start of training.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conddetr_jax.criterion import matching  # pylint: disable=g-import-not-at-top
from configs import default  # pylint: disable=g-import-not-at-top


def _timeit(fn, *args, repeats):
  """Median wall time in ms of fn(*args) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _counts(kind, images, slots, rng):
  if kind == "coco-like":
    counts = np.minimum(rng.geometric(1 / 7.3, size=images), slots)
    counts[0] = min(93, slots)
    return counts
  if kind == "7 each":
    return np.full(images, min(7, slots))
  return np.full(images, slots)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--queries", type=int, default=300)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--slots", type=int, default=100)
  parser.add_argument("--classes", type=int, default=91)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  config = default.get_config().matcher
  logits = jnp.asarray(
    rng.normal(-4.6, 1.0, (args.layers, args.images, args.queries, args.classes)), jnp.float32
  )
  boxes = jnp.asarray(
    rng.uniform(0.1, 0.9, (args.layers, args.images, args.queries, 4)), jnp.float32
  )
  tgt_boxes = jnp.asarray(rng.uniform(0.1, 0.5, (args.images, args.slots, 4)), jnp.float32)
  tgt_labels = jnp.asarray(rng.integers(0, args.classes, (args.images, args.slots)), jnp.int32)

  print(f"backend={jax.default_backend()} devices={jax.devices()}")
  print(
    f"{args.layers} layers x {args.images} images x {args.queries} queries x "
    f"{args.slots} target slots, median of {args.repeats} runs, ms"
  )
  print(f"{'targets':>10} {'valid':>6} {'device':>9} {'scipy':>9} {'optax':>9}")

  def run_match(solver):
    cfg = config.copy_and_resolve_references()
    cfg.solver = solver
    return jax.jit(lambda lg, bx, targets: matching.match(lg, bx, targets, cfg))

  device_match, scipy_match = run_match("hungarian"), run_match("scipy")

  @jax.jit
  def optax_match(lg, bx, targets):
    cost = matching.cost_matrix(lg, bx, targets, config)
    flat = cost.reshape((-1,) + cost.shape[-2:])
    return jax.vmap(optax.assignment.hungarian_algorithm)(flat)

  for kind in ("coco-like", "7 each", "all slots"):
    counts = _counts(kind, args.images, args.slots, rng)
    valid = jnp.asarray(np.arange(args.slots)[None] < counts[:, None])
    inputs = (logits, boxes, matching.Targets(tgt_boxes, tgt_labels, valid))
    figures = [
      _timeit(fn, *inputs, repeats=args.repeats) for fn in (device_match, scipy_match, optax_match)
    ]
    print(f"{kind:>10} {int(counts.sum()):>6} " + " ".join(f"{t:9.1f}" for t in figures))


if __name__ == "__main__":
  main()
