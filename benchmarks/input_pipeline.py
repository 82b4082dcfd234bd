"""Input pipeline figures: training images per CPU-second beside the original's DataLoader, and
the padding waste of size buckets.

    python benchmarks/input_pipeline.py --cores 2 [--images 256 --batch 16 --batches 40]
    python benchmarks/input_pipeline.py --waste_only
    python benchmarks/input_pipeline.py --ops_only [--images 64]

Throughput (the default): writes ``--images`` COCO-like 640x480 JPEGs (photo-like texture, ~7 boxes
each), then on ``--cores`` cores (``sched_setaffinity`` before TensorFlow or torch start):

- this project's training iterator with the original's recipe (configs/default.py: flip,
  multi-scale 480..800 / crop branch, max 1333, 64-multiple buckets) and ``--train_resize``
  (default: the config's, "fast"), ``--batches`` batches of ``--batch`` after a warm-up;
- the original's training transform on the same JPEGs, as the original runs it: PIL decode,
  torchvision's hflip / resize / crop on PIL images, ToTensor, Normalize, boxes alongside, in a
  torch DataLoader with one worker per core, batches of 2 (the original's per GPU) padded to
  their larger image; written here from the recipe, in a subprocess (no TensorFlow in it).

Both count the CPU time of every process and thread taking part (``/proc``: Linux), not wall
time, so load from other work on the machine matters less. The last line, for scripts:
``input train_images_per_cpu_s=<x> original_images_per_cpu_s=<y> ratio=<x/y> cores=<n>``.

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
import subprocess
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
  from conddetr_jax.data import coco, pipeline  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  ds = config.dataset
  sizes = coco_like_sizes(118287, np.random.default_rng(0))
  n = len(sizes)
  split = coco.Split(
    ann_path="",
    image_dir="",
    image_ids=np.arange(n),
    file_names=np.array([""] * n),
    sizes=sizes,
    box_start=np.zeros(n + 1, np.int64),
    boxes=np.zeros((0, 4), np.float32),
    labels=np.zeros(0, np.int32),
    categories={},
    missing=np.zeros(n, bool),
  )
  buckets = pipeline.buckets_for_sizes(sizes, ds)
  square = int(buckets.max())
  print(
    f"buckets ({len(buckets)}, config num_buckets={ds.num_buckets}, multiples of "
    f"{ds.size_divisibility}): {[tuple(b) for b in buckets.tolist()]}"
  )
  plans = {
    "train epoch 0": pipeline.train_epoch_plan(config, split, buckets, 0, global_batch_size),
    "eval": pipeline.eval_plan(config, split, buckets, global_batch_size),
  }
  for name, plan in plans.items():
    valid = plan["valid"]
    out = plan["candidates"][valid, 0, 8:10].astype(np.float64)
    content = (out[:, 0] * out[:, 1]).sum()
    padded = (plan["bucket"].astype(np.float64).prod(1)).sum()  # blank eval slots count as waste
    shapes = np.unique(plan["bucket"], axis=0)
    # The original pads each batch of 2 (per GPU) to its largest image; its batches are random.
    shuffled = out[np.random.default_rng(1).permutation(len(out))][: len(out) // 2 * 2]
    pairs = shuffled.reshape(-1, 2, 2).max(1).prod(1).sum() * 2
    print(
      f"{name:14s} batch {global_batch_size}: waste buckets {1 - content / padded:.3f} "
      f"({len(shapes)} shapes), square {square}x{square} "
      f"{1 - content / (len(plan['valid']) * square**2):.3f}, original pad-to-batch-max (batch 2, "
      f"dynamic shapes) {1 - content / pairs:.3f}"
    )
  # Evaluation with its own buckets (config.dataset.eval_num_buckets), one image per device: what
  # it pads and how many shapes (compiled programs) it needs; the original's DC5 models pad nothing.
  for divisibility in (64, 32):
    for num in (8, 16, 1000):
      own = config.copy_and_resolve_references()
      own.dataset.update(size_divisibility=divisibility, eval_num_buckets=num)
      plan = pipeline.eval_plan(own, split, pipeline.eval_buckets(own, split), 1)
      out = plan["candidates"][:, 0, 8:10].astype(np.float64)
      waste = 1 - (out[:, 0] * out[:, 1]).sum() / plan["bucket"].astype(np.float64).prod(1).sum()
      print(
        f"eval, eval_num_buckets={num:4d}, size_divisibility={divisibility}, batch 1: waste "
        f"{waste:.3f} ({len(np.unique(plan['bucket'], axis=0))} shapes)"
      )


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
      anns.append(
        {
          "id": len(anns) + 1,
          "image_id": i + 1,
          "category_id": int(rng.integers(1, 91)),
          "bbox": [x, y, rng.uniform(5, 80), rng.uniform(5, 80)],
          "iscrowd": 0,
          "area": 1.0,
        }
      )
  ann_path = os.path.join(root, "instances.json")
  with open(ann_path, "w") as f:
    json.dump(
      {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k, "name": str(k)} for k in range(1, 91)],
      },
      f,
    )
  return ann_path, image_dir


def cpu_seconds(pids: list[int]) -> float:
  """User + system CPU seconds so far of these processes, all their threads included."""
  ticks = os.sysconf("SC_CLK_TCK")
  total = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
  return total / ticks


def throughput(args: argparse.Namespace, ann_path: str, image_dir: str) -> float:
  """This project's training iterator: prints and returns its images per CPU-second."""
  from conddetr_jax import data  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.dataset.update(
    dict(
      source="coco",
      train_ann=ann_path,
      train_images=image_dir,
      val_ann=ann_path,
      val_images=image_dir,
    )
  )
  if args.train_resize:
    config.dataset.train_resize = args.train_resize
  it = data.train_iterator(config, global_batch_size=args.batch, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  start, cpu_start = time.perf_counter(), cpu_seconds([os.getpid()])
  for _ in range(args.batches):
    batch = next(it)
  seconds, cpu = time.perf_counter() - start, cpu_seconds([os.getpid()]) - cpu_start
  images = args.batches * args.batch
  cores = len(os.sched_getaffinity(0))
  print(
    f"this project (train_resize={config.dataset.train_resize}), batch {args.batch}, last batch "
    f"{batch['image'].shape}: {images / seconds:.1f} images/s on {cores} cores (wall clock); "
    f"{images / cpu:.1f} images per CPU-second"
  )
  return images / cpu


def original_get_size(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
  """The original recipe's output (h, w) for a shorter side of ``size`` and a longer one <=
  max_size."""
  if max_size is not None:
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > max_size:
      size = int(round(max_size * lo / hi))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  return (int(size * h / w), size) if w < h else (size, int(size * w / h))


class OriginalTrainDataset:
  """The original's train dataset and transform, from its recipe: PIL images through torchvision.

  Random horizontal flip; then, each with p=0.5, a resize to a random shorter side of 480..800
  (step 32) with the longer side <= 1333, or a resize to 400/500/600, a random crop of 384..600 per
  side and the same random resize; ToTensor; Normalize. Boxes (absolute xyxy) follow each step.
  """

  def __init__(self, ann_path: str, image_dir: str):
    with open(ann_path, encoding="utf-8") as f:
      coco = json.load(f)
    self.paths = [os.path.join(image_dir, im["file_name"]) for im in coco["images"]]
    row = {im["id"]: i for i, im in enumerate(coco["images"])}
    self.boxes = [[] for _ in self.paths]
    for ann in coco["annotations"]:
      x, y, w, h = ann["bbox"]
      self.boxes[row[ann["image_id"]]].append([x, y, x + w, y + h])

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int):
    import random  # pylint: disable=g-import-not-at-top

    from PIL import Image  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision.transforms.functional as F  # pylint: disable=g-import-not-at-top

    with Image.open(self.paths[i]) as f:
      image = f.convert("RGB")
    boxes = torch.tensor(self.boxes[i], dtype=torch.float32).reshape(-1, 4)

    def resize(image, boxes, size, max_size=None):
      h, w = original_get_size(image.height, image.width, size, max_size)
      ratio = torch.tensor([w / image.width, h / image.height] * 2)
      return F.resize(image, [h, w]), boxes * ratio

    if random.random() < 0.5:
      image = F.hflip(image)
      boxes = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [image.width, 0, image.width, 0]
      )
    scales = list(range(480, 801, 32))
    if random.random() >= 0.5:
      image, boxes = resize(image, boxes, random.choice([400, 500, 600]))
      h = random.randint(min(384, image.height), min(image.height, 600))
      w = random.randint(min(384, image.width), min(image.width, 600))
      top, left = random.randint(0, image.height - h), random.randint(0, image.width - w)
      image = F.crop(image, top, left, h, w)
      boxes = torch.minimum(
        (boxes - torch.tensor([left, top, left, top])).clamp(min=0), torch.tensor([w, h, w, h])
      )
      boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    image, boxes = resize(image, boxes, random.choice(scales), 1333)
    tensor = F.normalize(F.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return tensor, boxes


def pad_to_largest(items):
  """The original's collate: images zero-padded to the batch's largest, with a padding mask."""
  import torch  # pylint: disable=g-import-not-at-top

  h = max(t.shape[1] for t, _ in items)
  w = max(t.shape[2] for t, _ in items)
  images = torch.zeros(len(items), 3, h, w)
  mask = torch.ones(len(items), h, w, dtype=torch.bool)
  for k, (t, _) in enumerate(items):
    images[k, :, : t.shape[1], : t.shape[2]].copy_(t)
    mask[k, : t.shape[1], : t.shape[2]] = False
  return images, mask, [b for _, b in items]


def original_throughput(args: argparse.Namespace, ann_path: str, image_dir: str) -> float:
  """The original's DataLoader (one worker per core, batch 2): prints and returns its images per
  CPU-second (main process and workers). Runs in a process of its own without TensorFlow."""
  import multiprocessing  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  import tests.conftest  # pylint: disable=g-import-not-at-top,unused-import  (lets torchvision import here)

  cores = len(os.sched_getaffinity(0))
  pids = multiprocessing.get_context("fork").Array("i", cores)
  loader = torch.utils.data.DataLoader(
    OriginalTrainDataset(ann_path, image_dir),
    batch_size=2,
    shuffle=True,
    num_workers=cores,
    collate_fn=pad_to_largest,
    persistent_workers=True,
    drop_last=True,
    multiprocessing_context="fork",
    worker_init_fn=lambda k: pids.__setitem__(k, os.getpid()),
    generator=torch.Generator().manual_seed(0),
  )
  batches = iter(())

  def next_batch():
    nonlocal batches
    try:
      return next(batches)
    except StopIteration:
      batches = iter(loader)
      return next(batches)

  images = args.batches * args.batch
  for _ in range(5 * args.batch // 2):
    next_batch()
  everyone = [os.getpid(), *pids]
  start, cpu_start = time.perf_counter(), cpu_seconds(everyone)
  for _ in range(images // 2):
    next_batch()
  seconds, cpu = time.perf_counter() - start, cpu_seconds(everyone) - cpu_start
  print(
    f"original (PIL + torchvision in a DataLoader, {cores} workers, batch 2): "
    f"{images / seconds:.1f} images/s on {cores} cores (wall clock); {images / cpu:.1f} images per "
    "CPU-second"
  )
  return images / cpu


def _images_per_second(fns: list, inputs: list, repeats: int = 3) -> list[float]:
  """Single-threaded throughput of functions mapped over ``inputs`` in tf.data, timed in turn
  (best of ``repeats`` each), so that load from other processes hits them alike."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  datasets = [
    tf.data.Dataset.from_tensor_slices(inputs).map(fn).with_options(options) for fn in fns
  ]
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
  pil_decode = lambda c: tf.numpy_function(
    lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), [c], tf.uint8
  )
  decoded = [transforms.decode_image(tf.constant(c)) for c in contents]
  old_resize = lambda hw, antialias: (
    lambda x: tf.image.resize(transforms.normalize_image(x), hw, antialias=antialias)
  )
  new_resize = lambda hw: (
    lambda x: transforms.normalize_image(transforms.resize_image(x, tf.constant(hw)))
  )
  pil_resize = lambda hw: (
    lambda x: transforms.normalize_image(
      tf.numpy_function(
        lambda a: np.asarray(Image.fromarray(a).resize(hw[::-1], Image.BILINEAR)), [x], tf.uint8
      )
    )
  )
  rows = [
    (
      "decode 640x480 JPEG q90",
      *_images_per_second([fast, transforms.decode_image, pil_decode], contents),
    )
  ]
  for hw, antialias in (((800, 1066), False), ((400, 533), True)):
    rows.append(
      (
        f"resize 640x480 -> {hw[1]}x{hw[0]} + normalise",
        *_images_per_second([old_resize(hw, antialias), new_resize(hw), pil_resize(hw)], decoded),
      )
    )
  print(
    f"single-threaded images/s, {len(contents)} images: op | before (TF fast IDCT / TF float "
    "bilinear) | now (accurate IDCT / PIL-exact TF ops) | PIL itself (the original's cost) | now / "
    "before"
  )
  for name, before, now, pil in rows:
    print(f"  {name:40s} {before:8.1f} {now:8.1f} {pil:8.1f}   x{now / before:.2f}")


def stage_costs(args: argparse.Namespace) -> None:
  """CPU milliseconds per image of each step of the training transform, both ``train_resize``
  modes, single-threaded tf.data over one epoch's plan of the benchmark's JPEGs (best of 3)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from conddetr_jax.data import coco, pipeline, transforms  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1

  def ms_per_image(fn, rows):
    dataset = tf.data.Dataset.from_tensor_slices(rows).map(fn).with_options(options)
    best = np.inf
    for _ in range(3):
      start = time.process_time()
      for _ in dataset:
        pass
      best = min(best, time.process_time() - start)
    return best / len(rows) * 1000

  with tempfile.TemporaryDirectory() as root:
    ann_path, image_dir = write_jpegs(root, args.images)
    config = default.get_config()
    config.dataset.update(dict(source="coco", train_ann=ann_path, train_images=image_dir))
    split = coco.load_split(config, "train")
    paths = tf.constant([split.path(i) for i in range(len(split))])
    hw = tf.constant(split.sizes[0])  # every image is 480x640
    print(
      f"CPU ms per image, single-threaded, {len(split)} 640x480 JPEGs, one epoch's draws: step | "
      "fast | pil"
    )
    rows = {}
    for mode in transforms.TRAIN_RESIZE_MODES:
      config.dataset.train_resize = mode
      plan = pipeline.train_epoch_plan(config, split, pipeline.buckets(config), 0, 1)
      rows[mode] = plan["candidates"][:, 0]
    read = lambda c: tf.io.read_file(paths[c[0]])
    window = lambda c: transforms.decode_window(read(c), transforms.unflipped_window(c[1:], hw[1]))[
      0
    ]
    whole = lambda c: transforms.decode_image(read(c))
    boxes, labels = tf.constant([[100.0, 80.0, 300.0, 260.0]] * 7), tf.zeros([7], tf.int32)
    no_boxes, no_labels = tf.zeros([0, 4]), tf.zeros([0], tf.int32)
    steps = [
      ("read the file", read, read),
      ("+ decode (fast: the window only)", window, whole),
      (
        "+ flip, resize(s), normalise",
        lambda c: transforms.fast_train_image(window(c), c[1:]),
        lambda c: transforms.normalize_image(
          transforms.apply_geometry(whole(c), no_boxes, no_labels, c[1:])[0]
        ),
      ),
      (
        "7 boxes alone",
        lambda c: transforms.geometry_boxes(boxes, labels, c[1:], c[2:4]),
        lambda c: transforms.geometry_boxes(boxes, labels, c[1:], hw),
      ),
    ]
    for name, fast, pil in steps:
      print(
        f"  {name:36s} {ms_per_image(fast, rows['fast']):6.2f} "
        f"{ms_per_image(pil, rows['pil']):6.2f}"
      )


def side_by_side(args: argparse.Namespace) -> None:
  """Both training pipelines on the same JPEGs; ends with the line for scripts."""
  with tempfile.TemporaryDirectory() as root:
    ann_path, image_dir = write_jpegs(root, args.images)
    mean_kb = (
      np.mean([os.path.getsize(os.path.join(image_dir, f)) for f in os.listdir(image_dir)]) / 1024
    )
    print(
      f"{args.images} COCO-like 640x480 JPEGs (~{mean_kb:.0f} KB, quality 90); "
      f"{args.batches * args.batch} images timed per pipeline after a warm-up"
    )
    # Its own process: torch's workers fork from it, which is safe without TensorFlow's threads.
    original = (
      subprocess.run(
        [
          sys.executable,
          os.path.abspath(__file__),
          "--original_only",
          f"--data={root}",
          f"--batch={args.batch}",
          f"--batches={args.batches}",
        ],
        check=True,
        capture_output=True,
        text=True,
      )
      .stdout.strip()
      .splitlines()
    )
    print(original[-2])
    ours = throughput(args, ann_path, image_dir)
  theirs = float(original[-1])
  print(
    f"input train_images_per_cpu_s={ours:.1f} original_images_per_cpu_s={theirs:.1f} "
    f"ratio={ours / theirs:.2f} cores={len(os.sched_getaffinity(0))}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cores", type=int, default=0, help="restrict to this many cores (0 = all)")
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument(
    "--train_resize", default="", help="config.dataset.train_resize ('' = the config's)"
  )
  parser.add_argument("--waste_only", action="store_true")
  parser.add_argument(
    "--ops_only", action="store_true", help="only the decode/resize op comparison"
  )
  parser.add_argument(
    "--stages", action="store_true", help="only the training transform's steps, CPU per image"
  )
  parser.add_argument(
    "--original_only", action="store_true", help=argparse.SUPPRESS
  )  # side_by_side's child
  parser.add_argument("--data", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  available = sorted(os.sched_getaffinity(0))
  if args.cores:
    # Before TensorFlow or torch start: thread pools, AUTOTUNE and the workers inherit the affinity.
    os.sched_setaffinity(0, available[: args.cores])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.original_only:
    print(
      original_throughput(
        args, os.path.join(args.data, "instances.json"), os.path.join(args.data, "images")
      )
    )
  elif args.ops_only:
    decode_resize_ops(args)
  elif args.stages:
    stage_costs(args)
  elif args.waste_only:
    padding_waste(args.batch)
  else:
    side_by_side(args)


if __name__ == "__main__":
  main()
