"""How much evaluation padding moves a trained model's detections, and what finer buckets cost.

    python benchmarks/eval_padding.py --checkpoint=/tmp/conddetr_demo [--config=configs/demo.py]
        [--settings=all:1,shared:8,3:8,all:8]

Each setting is ``eval_num_buckets:eval_per_device_batch_size`` (``shared`` = 0, the buckets of the
train augmentation; ``all`` = one bucket per distinct eval size, i.e. no image padded beyond
``size_divisibility`` when the batch holds one image). The first setting is the reference. For each
setting, as soon as it is done, it prints: the padded shapes used, the padding waste (padded pixels
/ all pixels of the eval batches, blank slots included), the compile time (first evaluation minus a
second one in the same process, whose programs are cached), COCO box AP, and against the reference
the share of the reference's top-10 detections per image that are no longer among the setting's top
10 (same label and box IoU >= 0.9 counts as the same detection) and the mean score change of those
kept.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conddetr_jax import (
  data,  # pylint: disable=g-import-not-at-top
  models,  # pylint: disable=g-import-not-at-top
  sharding,  # pylint: disable=g-import-not-at-top
)
from conddetr_jax.checkpoints import weights  # pylint: disable=g-import-not-at-top
from conddetr_jax.data import (
  coco,  # pylint: disable=g-import-not-at-top
  pipeline,  # pylint: disable=g-import-not-at-top
)
from conddetr_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top

_TOP = 10
_SAME_IOU = 0.9
_ALL_SIZES = 100000  # more buckets than any split has distinct sizes


@dataclasses.dataclass
class Outcome:
  name: str
  shapes: list
  waste: float
  compile_s: float
  run_s: float
  ap: float
  dets: dict


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, 4) x (M, 4) xyxy -> (N, M)."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
  return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def compare(ref: dict, other: dict) -> tuple[float, float]:
  """(share of ref's top-10 detections not in other's top 10, mean |score change| of the kept)."""
  changed, total, score_diffs = 0, 0, []
  for i in range(len(ref["image_id"])):
    assert ref["image_id"][i] == other["image_id"][i]
    overlap = iou(ref["boxes"][i, :_TOP], other["boxes"][i, :_TOP])
    same = (overlap >= _SAME_IOU) & (
      ref["labels"][i, :_TOP, None] == other["labels"][i, None, :_TOP]
    )
    for j in range(_TOP):
      total += 1
      if same[j].any():
        score_diffs.append(abs(ref["scores"][i, j] - other["scores"][i, :_TOP][same[j]].max()))
      else:
        changed += 1
  return changed / total, float(np.mean(score_diffs)) if score_diffs else float("nan")


def run(config, model, variables, mesh, name: str) -> Outcome:
  split = coco.load_split(config, "val")
  global_batch = config.eval_per_device_batch_size * mesh.size
  plan = pipeline.eval_plan(config, split, pipeline.eval_buckets(config, split), global_batch)
  out = plan["candidates"][plan["valid"], 0, 8:10].astype(np.float64)
  waste = 1 - (out[:, 0] * out[:, 1]).sum() / plan["bucket"].astype(np.float64).prod(1).sum()
  shapes = sorted({tuple(b) for b in plan["bucket"].tolist()})
  times = []
  for _ in range(2):
    start = time.perf_counter()
    dets = coco_eval.gather_detections(config, model, variables, mesh)
    times.append(time.perf_counter() - start)
  results = coco_eval.to_coco_results(
    dets["image_id"], dets["scores"], dets["labels"], dets["boxes"]
  )
  metrics, _ = coco_eval.coco_metrics(
    data.annotation_path(config, "val"), results, dets["image_id"]
  )
  return Outcome(name, shapes, waste, times[0] - times[1], times[1], metrics["AP"], dets)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--settings", default="all:1,shared:8,3:8,all:8")
  args = parser.parse_args()
  base = load_config(args.config)
  data.prepare_dataset(base)
  mesh = sharding.make_mesh()
  model = models.build_model(base)
  variables, step = weights.load_variables(base, args.checkpoint, sharding.replicated(mesh))
  print(
    f"checkpoint {args.checkpoint} (step {step}), {jax.device_count()} {jax.default_backend()} "
    f"device(s), size_divisibility {base.dataset.size_divisibility}",
    flush=True,
  )
  ref = None
  for setting in args.settings.split(","):
    buckets, batch = setting.split(":")
    config = base.copy_and_resolve_references()
    named = {"shared": 0, "all": _ALL_SIZES}
    config.dataset.eval_num_buckets = named[buckets] if buckets in named else int(buckets)
    config.eval_per_device_batch_size = int(batch)
    o = run(config, model, variables, mesh, f"eval_num_buckets={buckets}, batch {batch}")
    ref = ref or o
    changed, score_diff = compare(ref.dets, o.dets)
    print(
      f"{o.name:34s} shapes {len(o.shapes):2d} waste {o.waste:.3f}  compile {o.compile_s:6.1f} s  "
      f"run {o.run_s:6.1f} s  AP {o.ap:.4f}  top-{_TOP} changed vs reference {changed:.3f} "
      f"(kept: mean |score change| {score_diff:.4f})  shapes: {o.shapes}",
      flush=True,
    )


if __name__ == "__main__":
  main()
