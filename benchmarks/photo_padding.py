"""Do batching and size buckets change the detections on real photos? The evaluation path, batched
and bucketed as the config's defaults, against one unpadded image per device.

  python benchmarks/photo_padding.py [--configs=configs/r50.py,configs/r50_dc5.py]
      [--workdir=/tmp/photo_padding] [--seed=0] [--scale=1.0]

The photos are those shipped in installed packages (matplotlib's grace_hopper.jpg, the Rust
embedded book's f3.jpg, Jetty's demo jetty-pic.png), cropped and resized to assorted shapes
(``SHAPES``) and written with a COCO json to --workdir; nothing is downloaded. Sources that are
not installed are skipped (at least 6 shapes must remain).

For each config, with random weights (``--seed``; no released weights can be downloaded here), the
images go through ``coco_eval.gather_detections`` (eval.py's path) three times:
  alone:    ``eval_per_device_batch_size=1``, ``dataset.eval_num_buckets`` large and
            ``dataset.size_divisibility=1``: every image alone and unpadded (the reference);
  defaults: the config's batch and buckets, and its ``model.mask_padding`` (``eval``: masked);
  never:    the same with ``model.mask_padding=never`` (the original's padded forward).
and for each of the last two it prints the share of each image's top-10 detections of ``alone``
that it keeps (same label, every box coordinate within 0.5 px in the photo's pixels), per image
and over all.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import matplotlib
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.eval_padding import load_config
from conddetr_jax import data, models, sharding
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.inference import prediction

TOP = 10
BOX_TOLERANCE_PX = 0.5
_SIZE_FIELDS = (
  "train_scales",
  "train_max_size",
  "crop_resize_scales",
  "crop_min_size",
  "crop_max_size",
  "eval_size",
  "eval_max_size",
)
ALL_SIZES = 100000  # more eval buckets than distinct sizes: no image padded beyond its own size

# Real photos that installed packages ship: name -> where.
SOURCES = {
  "grace_hopper": os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"),
  "board": os.path.expanduser(
    "~/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/"
    "assets/f3.jpg"
  ),
  "pier": "/usr/lib/google-cloud-sdk/platform/google_appengine/google/appengine/tools/java/"
  "jetty12/jetty-home/modules/demo.d/root/images/jetty-pic.png",
}


@dataclasses.dataclass(frozen=True)
class Shape:
  """A crop of a source photo (left, top, right, bottom as fractions) resized to (width, height)."""

  source: str
  crop: tuple[float, float, float, float]
  size: tuple[int, int]


SHAPES = (
  Shape("grace_hopper", (0.0, 0.0, 1.0, 1.0), (512, 600)),
  Shape("grace_hopper", (0.1, 0.0, 0.9, 0.6), (480, 360)),
  Shape("grace_hopper", (0.2, 0.1, 0.8, 1.0), (300, 500)),
  Shape("board", (0.0, 0.0, 1.0, 1.0), (720, 477)),
  Shape("board", (0.3, 0.2, 0.9, 0.8), (500, 500)),
  Shape("board", (0.0, 0.3, 1.0, 0.7), (800, 320)),
  Shape("pier", (0.0, 0.0, 1.0, 1.0), (900, 277)),
  Shape("pier", (0.5, 0.0, 1.0, 1.0), (450, 277)),
)


def write_photos(workdir: str) -> tuple[str, str]:
  """Writes the photos of ``SHAPES`` whose source is installed, and their COCO json (no boxes):
  returns (json path, image folder)."""
  image_dir = os.path.join(workdir, "images")
  os.makedirs(image_dir, exist_ok=True)
  images = []
  for shape in SHAPES:
    if not os.path.exists(SOURCES[shape.source]):
      print(f"skipped ({SOURCES[shape.source]} is not installed): {shape}")
      continue
    photo = Image.open(SOURCES[shape.source]).convert("RGB")
    w, h = photo.size
    left, top, right, bottom = shape.crop
    crop = photo.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
    name = f"{len(images) + 1:02d}_{shape.source}_{shape.size[0]}x{shape.size[1]}.jpg"
    crop.resize(shape.size, Image.BICUBIC).save(os.path.join(image_dir, name), quality=95)
    images.append(
      {"id": len(images) + 1, "file_name": name, "width": shape.size[0], "height": shape.size[1]}
    )
  if len({(i["width"], i["height"]) for i in images}) < 6:
    raise SystemExit(f"only {len(images)} photos of the sources are installed: 6 shapes needed")
  categories = [{"id": i, "name": n} for i, n in prediction.COCO_CATEGORY_NAMES.items()]
  ann = os.path.join(workdir, "photos.json")
  with open(ann, "w") as f:
    json.dump({"images": images, "annotations": [], "categories": categories}, f)
  return ann, image_dir


def kept_shares(
  reference: dict[str, np.ndarray], other: dict[str, np.ndarray], top: int = TOP
) -> np.ndarray:
  """Per image, the share of ``reference``'s top-``top`` detections that ``other``'s top ``top``
  hold too: same label and every xyxy coordinate within ``BOX_TOLERANCE_PX``.

  Both are ``gather_detections`` outputs (sorted by score) of the same images in the same order.
  """
  if not np.array_equal(reference["image_id"], other["image_id"]):
    raise ValueError("the two runs evaluated different images")
  shares = []
  for i in range(len(reference["image_id"])):
    ref_boxes, boxes = reference["boxes"][i, :top], other["boxes"][i, :top]
    close = (np.abs(ref_boxes[:, None] - boxes[None]) <= BOX_TOLERANCE_PX).all(-1)
    same = close & (reference["labels"][i, :top, None] == other["labels"][i, None, :top])
    shares.append(same.any(1).mean())
  return np.array(shares)


def scale_sizes(ds, scale: float) -> None:
  """Multiplies every image size of ``config.dataset`` by ``scale`` (rounded): the same regime of
  buckets and padding at a fraction of the pixels."""
  for field in _SIZE_FIELDS:
    value = ds[field]
    ds[field] = (
      tuple(round(v * scale) for v in value) if isinstance(value, tuple) else round(value * scale)
    )


def settings(config) -> dict:
  """The three evaluation settings of the module docstring, as configs."""
  alone = config.copy_and_resolve_references()
  alone.eval_per_device_batch_size = 1
  alone.dataset.update(eval_num_buckets=ALL_SIZES, size_divisibility=1)
  never = config.copy_and_resolve_references()
  never.model.mask_padding = "never"
  return {"alone": alone, "defaults": config, "never": never}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="configs/r50.py,configs/r50_dc5.py")
  parser.add_argument("--workdir", default="/tmp/photo_padding")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--scale",
    type=float,
    default=1.0,
    help="scales every image size of the config (train and eval: the buckets follow), for CPUs",
  )
  args = parser.parse_args()
  ann, image_dir = write_photos(args.workdir)
  mesh = sharding.make_mesh()
  print(f"{jax.device_count()} {jax.default_backend()} device(s), loadavg {os.getloadavg()[0]:.1f}")
  for path in args.configs.split(","):
    config = load_config(path)
    config.dataset.update(
      source="coco",
      root="",
      # The photos are the train split too: the default buckets are derived from its sizes.
      train_ann=ann,
      train_images=image_dir,
      val_ann=ann,
      val_images=image_dir,
    )
    scale_sizes(config.dataset, args.scale)
    data.prepare_dataset(config)
    variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(args.seed))
    print(
      f"{path}: random weights (seed {args.seed}); defaults: {config.eval_per_device_batch_size} "
      f"images per device, eval_num_buckets={config.dataset.eval_num_buckets}, "
      f"size_divisibility={config.dataset.size_divisibility}, "
      f"mask_padding={config.model.mask_padding}",
      flush=True,
    )
    dets = {
      name: coco_eval.gather_detections(c, models.build_model(c), variables, mesh)
      for name, c in settings(config).items()
    }
    for name in ("defaults", "never"):
      shares = kept_shares(dets["alone"], dets[name])
      print(
        f"{path} {name}: top-{TOP} detections kept {shares.mean():.1%} over {len(shares)} photos "
        f"(per photo: {' '.join(f'{s:.0%}' for s in shares)})",
        flush=True,
      )


if __name__ == "__main__":
  main()
