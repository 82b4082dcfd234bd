r"""The paper's claim in miniature: Conditional DETR's decoder vs DETR's, trained identically.

Both decoders train on the built-in synthetic dataset with the same seeds, data order, steps,
backbone, encoder, loss and schedule (only ``config.model.decoder`` differs), and COCO box AP on
the val split is measured every ``--eval_every`` steps. Writes ``<out>/convergence.csv`` (one row
per decoder, seed and evaluation) and ``<out>/convergence.png`` (mean AP per decoder against
step, with the min-max band over seeds), and prints how many steps each decoder needs to reach
the DETR decoder's final AP. ``--groups=1,5`` adds Group DETR training (``config.model.num_groups``)
as a second axis: every decoder trains once per group count.

  python benchmarks/convergence.py --out=/tmp/convergence        # 2 CPU cores: ~35 min (estimated)
  python benchmarks/convergence.py --out=DIR --steps=6000 --eval_every=500 --seeds=0,1,2 \
      --override=per_device_batch_size=16                       # a GPU: a longer run
  python benchmarks/convergence.py --out=DIR --groups=1,5       # with and without Group DETR
  python benchmarks/convergence.py --out=DIR --groups=1,5 --decoders=conditional  # Group DETR alone

Runs already evaluated at ``--steps`` in ``--out`` are reused, so seeds can train in parallel
processes, one per core, and a last call with all the seeds writes the CSV and the plot
(measured: 18 min a run on its core, 36 min in all, with other jobs on the same 2 cores):
  taskset -c 0 python benchmarks/convergence.py --out=/tmp/convergence --seeds=0 &
  taskset -c 1 python benchmarks/convergence.py --out=/tmp/convergence --seeds=1; wait
  python benchmarks/convergence.py --out=/tmp/convergence --seeds=0,1
"""

import argparse
import csv
import json
import os
import sys
import time

from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from conddetr_jax.training import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.training.metrics import METRICS_FILE  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position

DECODERS = ("conditional", "detr")


def _parse_override(text: str) -> tuple[list[str], object]:
  key, value = text.split("=", 1)
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    parsed = value
  return key.split("."), parsed


def run_config(
  decoder: str, seed: int, steps: int, eval_every: int, overrides: list[str], num_groups: int = 1
):
  """The demo config with this decoder, Group DETR group count and seed, evaluated every
  ``eval_every`` steps."""
  config = demo.get_config()
  # The study's model is the demo's first recipe, whatever the demo uses now: the whole ResNet-18 at
  # stride 32 with plain GroupNorm, two encoder layers with 1024-wide feed-forward blocks, 50
  # queries, no dense head, one query group unless --groups says otherwise, evaluated at 128 px.
  config.model.update(
    decoder=decoder,
    num_groups=num_groups,
    backbone_num_stages=4,
    dilation=False,
    backbone_norm="group_norm",
    enc_layers=2,
    dim_feedforward=1024,
    num_queries=50,
    dense_head=False,
  )
  config.dataset.eval_size = 128
  config.seed = seed
  config.total_steps = steps
  config.eval_every_steps = eval_every
  config.checkpoint_every_steps = steps
  config.evaluation.prediction_images = 0
  for text in overrides:
    path, value = _parse_override(text)
    node = config
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  return config


def read_ap_curve(workdir: str) -> list[tuple[int, float, float]]:
  """(step, AP, AP50) of every evaluation logged in ``<workdir>/metrics.jsonl``."""
  curve = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "AP" in record:
        curve[record["step"]] = (record["step"], record["AP"], record["AP50"])
  return [curve[s] for s in sorted(curve)]


def run_finished(workdir: str, steps: int) -> bool:
  """Whether ``workdir`` holds a run evaluated at ``steps`` (its final evaluation)."""
  if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
    return False
  return any(step == steps for step, _, _ in read_ap_curve(workdir))


def steps_to_reach(steps: np.ndarray, ap: np.ndarray, target: float) -> int | None:
  """The first evaluated step whose AP is >= target, or None."""
  reached = np.nonzero(ap >= target)[0]
  return int(steps[reached[0]]) if reached.size else None


def variant_name(decoder: str, num_groups: int) -> str:
  """A run variant's name in the plot, the printout and the workdirs: ``conditional``,
  ``detr_groups5`` ..."""
  return decoder if num_groups == 1 else f"{decoder}_groups{num_groups}"


def baseline_variant(variants: list[tuple[str, int]]) -> str:
  """The variant whose final AP the others race to: the DETR decoder with the first --groups value,
  else (conditional decoder alone) the first --groups value's run."""
  detr = [v for v in variants if v[0] == "detr"]
  return variant_name(*(detr or variants)[0])


def plot(curves: dict[str, np.ndarray], steps: np.ndarray, path: str) -> None:
  """Mean AP per variant against step, with the min-max band over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for variant, ap in curves.items():
    decoder, _, groups = variant.partition("_groups")
    label = {"conditional": "Conditional DETR decoder", "detr": "DETR decoder"}[decoder]
    label += f", {groups} groups" if groups else ""
    (line,) = ax.plot(
      steps,
      ap.mean(0),
      marker="o",
      label=f"{label} ({ap.shape[0]} seed{'s' if ap.shape[0] > 1 else ''})",
    )
    ax.fill_between(steps, ap.min(0), ap.max(0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training step")
  ax.set_ylabel("COCO box AP (synthetic val)")
  ax.set_title("Synthetic shapes: same data, seeds and schedule")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", required=True, help="output folder (one workdir per run inside)")
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
  parser.add_argument(
    "--groups", default="1", help="comma-separated config.model.num_groups values (Group DETR)"
  )
  parser.add_argument(
    "--decoders", default=",".join(DECODERS), help=f"comma-separated, of {DECODERS}"
  )
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    help="extra config field, e.g. per_device_batch_size=16 or model.num_queries=20",
  )
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)  # the training loop's progress lines (loss, images/s, ETA)
  seeds = [int(s) for s in args.seeds.split(",")]
  decoders = args.decoders.split(",")
  if not decoders or not set(decoders) <= set(DECODERS):
    parser.error(f"--decoders={args.decoders!r}: expected a comma-separated subset of {DECODERS}")
  variants = [
    (decoder, int(k)) for k in args.groups.split(",") for decoder in DECODERS if decoder in decoders
  ]
  os.makedirs(args.out, exist_ok=True)

  rows = []
  for seed in seeds:
    for decoder, num_groups in variants:
      name = variant_name(decoder, num_groups)
      workdir = os.path.join(args.out, f"{name}_seed{seed}")
      start = time.time()
      if not run_finished(
        workdir, args.steps
      ):  # finished runs (e.g. from a parallel invocation) are reused
        loop.train_and_evaluate(
          run_config(decoder, seed, args.steps, args.eval_every, args.override, num_groups), workdir
        )
      curve = read_ap_curve(workdir)
      print(
        f"{name} seed {seed}: final AP {curve[-1][1]:.3f} ({time.time() - start:.0f} s)", flush=True
      )
      rows += [
        dict(decoder=decoder, num_groups=num_groups, seed=seed, step=s, AP=ap, AP50=ap50)
        for s, ap, ap50 in curve
      ]

  csv_path = os.path.join(args.out, "convergence.csv")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["decoder", "num_groups", "seed", "step", "AP", "AP50"])
    writer.writeheader()
    writer.writerows(rows)

  steps = np.array(sorted({r["step"] for r in rows}))
  curves = {
    variant_name(d, k): np.array(
      [
        [
          next(
            r["AP"]
            for r in rows
            if (r["decoder"], r["num_groups"]) == (d, k) and r["seed"] == s and r["step"] == t
          )
          for t in steps
        ]
        for s in seeds
      ]
    )
    for d, k in variants
  }
  png_path = os.path.join(args.out, "convergence.png")
  plot(curves, steps, png_path)

  baseline = baseline_variant(variants)
  target = curves[baseline].mean(0)[-1]
  print(f"\nmean AP over {len(seeds)} seeds at each evaluated step:")
  width = max(len(v) for v in curves)
  print("step".ljust(width) + " " + " ".join(f"{s:>6d}" for s in steps))
  for variant, ap in curves.items():
    print(f"{variant:{width}s} " + " ".join(f"{a:6.3f}" for a in ap.mean(0)))
  for variant, ap in curves.items():
    reached = steps_to_reach(steps, ap.mean(0), target)
    print(
      f"steps for {variant} to reach {baseline}'s final AP {target:.3f}: "
      f"{reached if reached is not None else 'not reached'}"
    )
  print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
  main()
