"""Input pipeline figures: training images/s per CPU core, and the padding waste of size buckets.

    python benchmarks/input_pipeline.py [--cores 2 --images 256 --batch 16 --batches 40]
    python benchmarks/input_pipeline.py --waste_only
    python benchmarks/input_pipeline.py --ops_only [--images 64]

Throughput: writes ``--images`` COCO-like 640x480 JPEGs (photo-like texture, ~7 boxes each) and
times the training iterator with the original's recipe (configs/default.py: flip, multi-scale
480..800 / crop branch, max 1333, 64-multiple buckets), after a warm-up, on ``--cores`` cores
(``sched_setaffinity`` before TensorFlow starts). Images/s per core = images/s / cores.

Decode and resize ops, side by side in one run (single-threaded, images/s): TF's default JPEG
decode (fast IDCT, what the pipeline used before) vs the accurate IDCT PIL uses (now), and TF's
float bilinear resize (before) vs the PIL-exact fixed-point resize (now), enlarging 640x480 to
the eval size 1066x800 and shrinking it to 533x400 (the crop branch's first resize).

Padding waste (padded pixels / all pixels) on a COCO-like size distribution (118k images, longer
side mostly 640, COCO's mix of 4:3, 3:2, 16:9, square and portrait shapes): the bucket set
derived by the pipeline vs one 1344x1344 square, for one training epoch's real batch plan and for
evaluation; the original's per-batch padding (to the largest image of each batch of 2, not a
static shape) is shown for reference; then evaluation with its own buckets
(``config.dataset.eval_num_buckets``), one image per device, at size_divisibility 64 and 32.
"""

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def coco_like_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
  """(n, 2) (h, w) drawn to resemble COCO train2017's image sizes."""
  longer = np.where(rng.random(n) < 0.95, 640, rng.integers(500, 640, n))
  ratio = rng.choice([3 / 4, 2 / 3, 9 / 16, 1.0, -1.0], p=[0.45, 0.30, 0.05, 0.05, 0.15], size=n)
  ratio = np.where(ratio < 0, rng.uniform(0.5, 1.0, n), ratio)
  shorter = np.round(longer * ratio).astype(np.int64)
  portrait = rng.random(n) < 0.25
  return np.stack([np.where(portrait, longer, shorter), np.where(portrait, shorter, longer)], -1)


def padding_waste(global_batch_size: int) -> None:
  from configs import default  # pylint: disable=g-import-not-at-top
  from conddetr_jax.data import coco, pipeline  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  ds = config.dataset
  sizes = coco_like_sizes(118287, np.random.default_rng(0))
  n = len(sizes)
  split = coco.Split(ann_path="", image_dir="", image_ids=np.arange(n), file_names=np.array([""] * n),
                     sizes=sizes, box_start=np.zeros(n + 1, np.int64), boxes=np.zeros((0, 4), np.float32),
                     labels=np.zeros(0, np.int32), categories={}, missing=np.zeros(n, bool))
  buckets = pipeline.buckets_for_sizes(sizes, ds)
  square = int(buckets.max())
  print(f"buckets ({len(buckets)}, config num_buckets={ds.num_buckets}, multiples of {ds.size_divisibility}): "
        f"{[tuple(b) for b in buckets.tolist()]}")
  plans = {"train epoch 0": pipeline.train_epoch_plan(config, split, buckets, 0, global_batch_size),
           "eval": pipeline.eval_plan(config, split, buckets, global_batch_size)}
  for name, plan in plans.items():
    valid = plan["valid"]
    out = plan["candidates"][valid, 0, 8:10].astype(np.float64)
    content = (out[:, 0] * out[:, 1]).sum()
    padded = (plan["bucket"].astype(np.float64).prod(1)).sum()  # blank eval slots count as waste
    shapes = np.unique(plan["bucket"], axis=0)
    # The original pads each batch of 2 (per GPU) to its largest image; its batches are random.
    shuffled = out[np.random.default_rng(1).permutation(len(out))][: len(out) // 2 * 2]
    pairs = shuffled.reshape(-1, 2, 2).max(1).prod(1).sum() * 2
    print(f"{name:14s} batch {global_batch_size}: waste buckets {1 - content / padded:.3f} "
          f"({len(shapes)} shapes), square {square}x{square} {1 - content / (len(plan['valid']) * square ** 2):.3f}, "
          f"original pad-to-batch-max (batch 2, dynamic shapes) {1 - content / pairs:.3f}")
  # Evaluation with its own buckets (config.dataset.eval_num_buckets), one image per device: what
  # it pads and how many shapes (compiled programs) it needs; the original's DC5 models pad nothing.
  for divisibility in (64, 32):
    for num in (8, 16, 1000):
      own = config.copy_and_resolve_references()
      own.dataset.update(size_divisibility=divisibility, eval_num_buckets=num)
      plan = pipeline.eval_plan(own, split, pipeline.eval_buckets(own, split), 1)
      out = plan["candidates"][:, 0, 8:10].astype(np.float64)
      waste = 1 - (out[:, 0] * out[:, 1]).sum() / plan["bucket"].astype(np.float64).prod(1).sum()
      print(f"eval, eval_num_buckets={num:4d}, size_divisibility={divisibility}, batch 1: waste {waste:.3f} "
            f"({len(np.unique(plan['bucket'], axis=0))} shapes)")


def write_jpegs(root: str, count: int) -> tuple[str, str]:
  """``count`` 640x480 photo-like JPEGs with ~7 boxes each; returns (json path, image folder)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image_dir = os.path.join(root, "images")
  os.makedirs(image_dir, exist_ok=True)
  images, anns = [], []
  for i in range(count):
    coarse = rng.uniform(0, 255, size=(12, 16, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    name = f"{i:012d}.jpg"
    with open(os.path.join(image_dir, name), "wb") as f:
      f.write(buf.getvalue())
    images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
    for _ in range(rng.poisson(7)):
      x, y = rng.uniform(0, 560), rng.uniform(0, 400)
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 91)),
                   "bbox": [x, y, rng.uniform(5, 80), rng.uniform(5, 80)], "iscrowd": 0, "area": 1.0})
  ann_path = os.path.join(root, "instances.json")
  with open(ann_path, "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)} for k in
                                                                     range(1, 91)]}, f)
  return ann_path, image_dir


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def throughput(args: argparse.Namespace, cores: int) -> None:
  from configs import default  # pylint: disable=g-import-not-at-top
  from conddetr_jax import data  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as root:
    ann_path, image_dir = write_jpegs(root, args.images)
    mean_kb = np.mean([os.path.getsize(os.path.join(image_dir, f)) for f in os.listdir(image_dir)]) / 1024
    config = default.get_config()
    config.dataset.update(dict(source="coco", train_ann=ann_path, train_images=image_dir, val_ann=ann_path,
                               val_images=image_dir))
    it = data.train_iterator(config, global_batch_size=args.batch, process_index=0, process_count=1)
    for _ in range(5):
      next(it)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(args.batches):
      batch = next(it)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  images = args.batches * args.batch
  print(f"640x480 JPEGs (~{mean_kb:.0f} KB), batch {args.batch}, last batch {batch['image'].shape}: "
        f"{images / seconds:.1f} images/s on {cores} cores = {images / seconds / cores:.1f} images/s per core "
        f"(wall clock); {images / cpu:.1f} images per CPU-second used (robust to other load)")


def _images_per_second(fns: list, inputs: list, repeats: int = 3) -> list[float]:
  """Single-threaded throughput of functions mapped over ``inputs`` in tf.data, timed in turn
  (best of ``repeats`` each), so that load from other processes hits them alike."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  datasets = [tf.data.Dataset.from_tensor_slices(inputs).map(fn).with_options(options) for fn in fns]
  best = [0.0] * len(fns)
  for _ in range(repeats):
    for k, dataset in enumerate(datasets):
      start = time.perf_counter()
      for _ in dataset:
        pass
      best[k] = max(best[k], len(inputs) / (time.perf_counter() - start))
  return best


def decode_resize_ops(args: argparse.Namespace) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from conddetr_jax.data import transforms  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as root:
    _, image_dir = write_jpegs(root, args.images)
    contents = []
    for name in sorted(os.listdir(image_dir)):
      with open(os.path.join(image_dir, name), "rb") as f:
        contents.append(f.read())
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fast = lambda c: tf.io.decode_image(c, channels=3, expand_animations=False)
  pil_decode = lambda c: tf.numpy_function(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), [c],
                                           tf.uint8)
  decoded = [transforms.decode_image(tf.constant(c)) for c in contents]
  old_resize = lambda hw, antialias: lambda x: tf.image.resize(transforms.normalize_image(x), hw, antialias=antialias)
  new_resize = lambda hw: lambda x: transforms.normalize_image(transforms.resize_image(x, tf.constant(hw)))
  pil_resize = lambda hw: lambda x: transforms.normalize_image(tf.numpy_function(
      lambda a: np.asarray(Image.fromarray(a).resize(hw[::-1], Image.BILINEAR)), [x], tf.uint8))
  rows = [("decode 640x480 JPEG q90", *_images_per_second([fast, transforms.decode_image, pil_decode], contents))]
  for hw, antialias in (((800, 1066), False), ((400, 533), True)):
    rows.append((f"resize 640x480 -> {hw[1]}x{hw[0]} + normalise",
                 *_images_per_second([old_resize(hw, antialias), new_resize(hw), pil_resize(hw)], decoded)))
  print(f"single-threaded images/s, {len(contents)} images: op | before (TF fast IDCT / TF float bilinear) | "
        "now (accurate IDCT / PIL-exact TF ops) | PIL itself (the original's cost) | now / before")
  for name, before, now, pil in rows:
    print(f"  {name:40s} {before:8.1f} {now:8.1f} {pil:8.1f}   x{now / before:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cores", type=int, default=0, help="restrict to this many cores (0 = all)")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--waste_only", action="store_true")
  parser.add_argument("--ops_only", action="store_true", help="only the decode/resize op comparison")
  args = parser.parse_args()
  available = sorted(os.sched_getaffinity(0))
  if args.cores:
    # Before TensorFlow starts: its thread pools and AUTOTUNE size themselves from the affinity.
    os.sched_setaffinity(0, available[:args.cores])
  cores = len(os.sched_getaffinity(0))
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.ops_only:
    decode_resize_ops(args)
    return
  padding_waste(args.batch)
  if not args.waste_only:
    decode_resize_ops(args)
    throughput(args, cores)


if __name__ == "__main__":
  main()
