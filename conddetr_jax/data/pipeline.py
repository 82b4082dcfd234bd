"""Train and eval iterators: a host-side plan per epoch, executed by tf.data.

The plan of an epoch is computed in numpy from (seed, epoch): the shuffled order, each image's
augmentation geometry (``transforms``), batches of one size bucket each (``batching``), and a
few fallback images per slot. tf.data then only reads, decodes, transforms and pads the planned
items, in parallel but in plan order. Resuming at step s is entering the plan at s.

Unreadable images: each slot lists its image, then (training, not strict) up to
``NUM_FALLBACKS`` later images of the epoch that fit its bucket, then a blank sentinel. tf.data
takes the first that decodes (``ignore_errors`` on the decode step only), so shapes and the order
of every other slot are unaffected, and the substitution depends only on the files, never on
timing. The host side sees which item was used and warns, naming the file and the reason, with a
running count; with ``strict=True``, or in evaluation, it raises instead.
"""

import itertools

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from conddetr_jax import storage
from conddetr_jax.data import batching, coco, transforms

# Buckets are derived from at most this many train images, each with this many augmentation draws.
_BUCKET_SAMPLE_IMAGES = 20000
_BUCKET_SAMPLE_DRAWS = 2
_SENTINEL = -1


class BadImageError(RuntimeError):
  """A listed image is missing or cannot be decoded (and may not be skipped)."""


def _hide_accelerators_from_tf() -> None:
  """TF only runs the input pipeline: keep it off GPUs/TPUs so that JAX owns them."""
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):  # already initialised, or no such device type: nothing to do
    pass


def _max_side(ds: ml_collections.ConfigDict) -> int:
  return int(batching.round_up(max(ds.train_max_size, ds.eval_max_size), ds.size_divisibility))


def buckets(config: ml_collections.ConfigDict) -> np.ndarray:
  """The padded shapes (H, W) of all batches, train and eval: ``config.dataset.buckets`` if given,
  else derived from the train images' sizes; the envelope (max H, max W) is always included.

  Returns:
    (Nb, 2) int64, sorted by area.
  """
  ds = config.dataset
  if ds.buckets:
    explicit = np.array([tuple(b) for b in ds.buckets], np.int64).reshape(-1, 2)
    env = np.array([batching.envelope(explicit)], np.int64)
    explicit = np.unique(np.concatenate([explicit, env]), axis=0)
    return explicit[np.argsort(explicit[:, 0] * explicit[:, 1], kind="stable")]
  return buckets_for_sizes(coco.load_split(config, "train").sizes, ds)


def buckets_for_sizes(sizes: np.ndarray, ds: ml_collections.ConfigDict) -> np.ndarray:
  """Buckets derived for images of these original sizes: from a sample of their train augmentation
  outputs and their eval resize (``batching.derive_buckets``).

  Args:
    sizes: (N, 2) original (h, w) of the train images.
    ds: ``config.dataset``.
  Returns:
    (Nb, 2) int64, sorted by area.
  """
  rng = np.random.default_rng(0)  # fixed: the buckets must not change with config.seed
  sample = sizes[rng.permutation(len(sizes))[:_BUCKET_SAMPLE_IMAGES]]
  draws = [transforms.train_geometry(rng, sample, ds) for _ in range(_BUCKET_SAMPLE_DRAWS)]
  draws.append(transforms.eval_geometry(sample, ds))
  out = transforms.limit_output_size(np.concatenate(draws), _max_side(ds))[:, 7:9]
  return batching.derive_buckets(out, _max_side(ds), ds.size_divisibility, ds.num_buckets)


def eval_buckets(config: ml_collections.ConfigDict, split: coco.Split) -> np.ndarray:
  """The padded shapes of evaluation.

  ``config.dataset.eval_num_buckets`` = 0: the shared set (``buckets``), chosen for the train
  augmentation's sizes. > 0: that many shapes (at most; each one compiled program) derived from the
  evaluated split's own eval sizes, so that images are padded less (less compute). With the
  backbone's masking (``model.mask_padding``, the default in evaluation) padding does not change
  the detections; without it (``never``, the original's forward) it does, and enough buckets for
  every distinct size pad each image only up to a multiple of ``size_divisibility``. See
  docs/input_parity.md for measured effects and compile times.

  Returns:
    (Nb, 2) int64, sorted by area.
  """
  ds = config.dataset
  if ds.eval_num_buckets <= 0:
    return buckets(config)
  out = transforms.limit_output_size(transforms.eval_geometry(split.sizes, ds), _max_side(ds))[
    :, 7:9
  ]
  return batching.derive_buckets(out, _max_side(ds), ds.size_divisibility, ds.eval_num_buckets)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


# --------------------------------------------------------------------------------------- plans


def _candidate_rows(index: np.ndarray, geometry: np.ndarray) -> np.ndarray:
  """(..., 10) int32 rows [image index, geometry...]."""
  return np.concatenate([index[..., None], geometry], axis=-1).astype(np.int32)


def _sentinel_rows(slot_hw: np.ndarray) -> np.ndarray:
  """(S, 10) rows of a blank image filling the bucket: no flip, no resize, the whole window."""
  h, w = slot_hw[:, 0], slot_hw[:, 1]
  zero = np.zeros_like(h)
  geometry = np.stack([zero, h, w, zero, zero, h, w, h, w], axis=-1)
  return _candidate_rows(np.full(len(h), _SENTINEL), geometry)


def train_epoch_plan(
  config: ml_collections.ConfigDict,
  split: coco.Split,
  bucket_hw: np.ndarray,
  epoch: int,
  global_batch_size: int,
) -> dict[str, np.ndarray]:
  """The global plan of one training epoch (all processes).

  Returns:
    dict of arrays with a leading slot axis of steps_per_epoch * global_batch_size, in step
    order: ``candidates`` (S, C, 10) int32, ``bucket`` (S, 2) int32, ``valid`` (S,) bool.
  """
  ds = config.dataset
  rng = np.random.default_rng([config.seed, epoch])
  order = rng.permutation(len(split))
  geometry = transforms.limit_output_size(
    transforms.train_geometry(rng, split.sizes[order], ds), _max_side(ds)
  )
  if ds.train_resize == "fast":
    geometry = transforms.in_source_pixels(geometry, split.sizes[order])
  out = geometry[:, 7:9]
  batches, batch_buckets = batching.group_batches(out, bucket_hw, global_batch_size)
  if len(batches[-1]) < global_batch_size:  # drop_last, as the original's train sampler
    batches, batch_buckets = batches[:-1], batch_buckets[:-1]
  positions = np.concatenate(batches)
  slot_bucket = np.repeat(batch_buckets, global_batch_size)
  slot_hw = bucket_hw[slot_bucket]
  if ds.strict:
    chosen = positions[:, None]
  else:
    fallbacks = batching.fallback_candidates(positions, slot_bucket, out, bucket_hw)
    chosen = np.concatenate([positions[:, None], fallbacks], axis=1)
  candidates = np.concatenate(
    [_candidate_rows(order[chosen], geometry[chosen]), _sentinel_rows(slot_hw)[:, None]], axis=1
  )
  return {
    "candidates": candidates,
    "bucket": slot_hw.astype(np.int32),
    "valid": np.ones(len(positions), bool),
  }


def eval_plan(
  config: ml_collections.ConfigDict,
  split: coco.Split,
  bucket_hw: np.ndarray,
  global_batch_size: int,
) -> dict[str, np.ndarray]:
  """The global eval plan: every image once, in id order grouped by bucket; the last batch is
  completed with blank slots marked ``valid=False``. Same arrays as ``train_epoch_plan``."""
  geometry = transforms.limit_output_size(
    transforms.eval_geometry(split.sizes, config.dataset), _max_side(config.dataset)
  )
  batches, batch_buckets = batching.group_batches(geometry[:, 7:9], bucket_hw, global_batch_size)
  positions = np.concatenate(batches)
  valid = np.ones(len(positions), bool)
  slot_hw = bucket_hw[np.repeat(batch_buckets, [len(b) for b in batches])]
  short = global_batch_size - len(batches[-1])
  if short:
    positions = np.concatenate([positions, np.zeros(short, np.int64)])
    valid = np.concatenate([valid, np.zeros(short, bool)])
    slot_hw = np.concatenate([slot_hw, np.repeat(slot_hw[-1:], short, axis=0)])
  primary = _candidate_rows(positions, geometry[positions])
  primary[~valid] = _sentinel_rows(slot_hw[~valid])
  candidates = np.stack([primary, _sentinel_rows(slot_hw)], axis=1)
  return {"candidates": candidates, "bucket": slot_hw.astype(np.int32), "valid": valid}


def local_plan(
  plan: dict[str, np.ndarray], global_batch_size: int, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
  """This process's slots: its block of every global batch, in step order."""
  block = batching.local_slice(global_batch_size, process_index, process_count)
  return {
    k: v.reshape(-1, global_batch_size, *v.shape[1:])[:, block].reshape(-1, *v.shape[1:])
    for k, v in plan.items()
  }


# ----------------------------------------------------------------------------------- tf.data


def read_file(path: tf.Tensor, remote: bool) -> tf.Tensor:
  """The bytes of the file ``path`` (a scalar string), as ``tf.io.read_file``.

  ``remote`` (the dataset is in a bucket): read by gcsfs (``storage``) rather than by TensorFlow's
  GCS file system, which cannot be pointed at an emulator, so the tests exercise the reads that
  training makes; docs/cloud-storage.md has the measured cost. Local files keep TensorFlow's read.
  """
  if not remote:
    return tf.io.read_file(path)
  contents = tf.numpy_function(storage.read_bytes, [path], tf.string, stateful=False)
  return tf.ensure_shape(contents, [])


class _Loader:
  """TF functions that turn a plan slot into a padded example (constants captured once).

  ``fast``: the plan's geometries are in source pixels (``transforms.in_source_pixels``); only
  their windows are decoded, and resized in float (``transforms.fast_train_image``). Otherwise
  the whole image is decoded and transformed PIL-exactly.
  """

  def __init__(self, split: coco.Split, max_boxes: int, fast: bool):
    self.max_boxes = max_boxes
    self.fast = fast
    self.paths = tf.constant([split.path(i) for i in range(len(split))])
    self.remote = storage.is_remote(split.image_dir)
    self.sizes = tf.constant(split.sizes, tf.int32)
    self.image_ids = tf.constant(split.image_ids, tf.int64)
    self.box_start = tf.constant(split.box_start, tf.int64)
    self.boxes = tf.constant(split.boxes.reshape(-1, 4), tf.float32)
    self.labels = tf.constant(split.labels, tf.int32)

  def decode(self, candidate: tf.Tensor) -> dict[str, tf.Tensor]:
    """Reads and decodes one candidate (``fast``: its window only); fails (to be skipped) if the
    file is missing, corrupt, or not of the size the json says (its boxes would not match)."""
    index = candidate[0]

    def read():
      contents = read_file(self.paths[index], self.remote)
      if self.fast:
        image, hw = transforms.decode_window(
          contents, transforms.unflipped_window(candidate[1:], self.sizes[index][1])
        )
      else:
        image = transforms.decode_image(contents)
        hw = tf.shape(image)[:2]
      tf.debugging.assert_equal(
        hw, self.sizes[index], message="decoded image size differs from the json's (height, width)"
      )
      return image

    # A sentinel's geometry keeps the blank image whole: its window is all of it.
    blank = lambda: tf.zeros(tf.stack([candidate[6], candidate[7], 3]), tf.uint8)
    return {"image": tf.cond(index >= 0, read, blank), "candidate": candidate}

  def example(self, item: dict[str, tf.Tensor], slot: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Augments and normalises one decoded item (``decode``); pads it to its slot's bucket if the
    slot is the first of its batch (``make_dataset`` pads the others while batching), and its boxes
    to ``max_boxes`` (``data.batch_spec`` lists them)."""
    bucket, valid, primary = slot["bucket"], slot["valid"], slot["candidates"][0, 0]
    index, geometry = item["candidate"][0], item["candidate"][1:]
    real = index >= 0
    safe = tf.maximum(index, 0)
    start = tf.where(real, self.box_start[safe], 0)
    stop = tf.where(real, self.box_start[safe + 1], 0)
    boxes, labels = self.boxes[start:stop], self.labels[start:stop]
    if self.fast:
      image = transforms.fast_train_image(item["image"], geometry)
      boxes, labels = transforms.geometry_boxes(boxes, labels, geometry, geometry[1:3])
    else:
      image, boxes, labels = transforms.apply_geometry(item["image"], boxes, labels, geometry)
      image = transforms.normalize_image(image)
    size = tf.shape(image)[:2]
    pad = tf.where(slot["first"], bucket - size, 0)
    image = tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]])
    pad_mask = tf.pad(tf.zeros(size, tf.bool), [[0, pad[0]], [0, pad[1]]], constant_values=True)
    num_boxes = tf.shape(boxes)[0]
    keep = tf.minimum(num_boxes, self.max_boxes)
    boxes = transforms.normalized_cxcywh(boxes[:keep], size)
    return {
      "image": image,
      "pad_mask": pad_mask,
      "boxes": tf.pad(boxes, [[0, self.max_boxes - keep], [0, 0]]),
      "labels": tf.pad(labels[:keep], [[0, self.max_boxes - keep]]),
      "box_valid": tf.range(self.max_boxes) < keep,
      "image_id": tf.where(real, self.image_ids[safe], tf.constant(-1, tf.int64)),
      "orig_size": tf.where(real, self.sizes[safe], bucket),
      "size": size,
      "valid": valid,
      "_index": index,
      "_primary": primary,
      "_num_boxes": num_boxes,
    }


def _slot_spec(num_candidates: int) -> dict[str, tf.TensorSpec]:
  return {
    "candidates": tf.TensorSpec([None, num_candidates, 10], tf.int32),
    "bucket": tf.TensorSpec([None, 2], tf.int32),
    "valid": tf.TensorSpec([None], tf.bool),
  }


def make_dataset(
  slots: tf.data.Dataset, loader: _Loader, local_batch_size: int, ds: ml_collections.ConfigDict
) -> tf.data.Dataset:
  """Slots (dicts of ``candidates``, ``bucket``, ``valid``) -> batches of padded examples.

  The slots come in batches of ``local_batch_size`` (from the first), each batch's slots sharing
  one bucket.
  """
  parallel = tf.data.AUTOTUNE if ds.num_parallel_calls < 0 else ds.num_parallel_calls
  slots = slots.enumerate().map(lambda i, slot: dict(slot, first=i % local_batch_size == 0))

  def first_readable(slot):
    items = tf.data.Dataset.from_tensor_slices(slot["candidates"]).map(
      lambda c: (loader.decode(c), slot)
    )
    return items.ignore_errors().take(1)

  # Only the decode runs in each slot's own small dataset (what ignore_errors needs); the rest is
  # one parallel map over all slots: run per slot inside it, it cost ~2 ms more per image.
  data = slots.interleave(
    first_readable, cycle_length=parallel, num_parallel_calls=parallel, deterministic=True
  )
  data = data.map(loader.example, num_parallel_calls=parallel, deterministic=True)
  # The first image of a batch comes padded to the bucket, so padded_batch pads the others to it as
  # it copies them into the batch: one copy of each image where padding, then batching, made two.
  padding = {k: tf.zeros([], spec.dtype) for k, spec in data.element_spec.items()}
  padding["pad_mask"] = tf.constant(True)
  data = data.padded_batch(local_batch_size, padding_values=padding).prefetch(ds.prefetch_batches)
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: tf.data already runs items in parallel, and splitting each small op over
  # threads costs more in hand-offs than it gains (measured: docs/input-speed.md).
  options.threading.max_intra_op_parallelism = 1
  return data.with_options(options)


class DataIterator:
  """Numpy batches of a tf.data pipeline, with the host-side checks of unreadable images and
  box truncation. ``num_skipped`` and ``num_truncated`` are running counts."""

  def __init__(self, dataset: tf.data.Dataset, split: coco.Split, *, skip_bad: bool, what: str):
    self._it = dataset.as_numpy_iterator()
    self._split = split
    self._skip_bad = skip_bad
    self._what = what
    self.num_skipped = 0
    self.num_truncated = 0

  def __iter__(self) -> "DataIterator":
    return self

  def _reason(self, index: int) -> str:
    """Why image ``index`` cannot be used (recomputed eagerly: tf.data only says *that* it
    failed)."""
    if self._split.missing[index]:
      return "file does not exist"
    try:
      image = transforms.decode_image(
        read_file(tf.constant(self._split.path(index)), storage.is_remote(self._split.image_dir))
      )
    except (tf.errors.OpError, OSError) as e:
      return f"{type(e).__name__}: {getattr(e, 'message', str(e)).splitlines()[0]}"
    if tuple(image.shape[:2]) != tuple(self._split.sizes[index]):
      return (
        f"decoded size {tuple(image.shape[:2])} differs from the json's (height, width) "
        f"{tuple(self._split.sizes[index])}"
      )
    return "unknown error"

  def _check(self, batch: dict[str, np.ndarray]) -> None:
    for k in np.flatnonzero(batch["valid"] & (batch["_index"] != batch["_primary"])):
      primary, used = int(batch["_primary"][k]), int(batch["_index"][k])
      path = self._split.path(primary)
      reason = self._reason(primary)
      if not self._skip_bad:
        hint = " (config.dataset.strict=True)" if self._what == "training" else ""
        raise BadImageError(f"Cannot read image {path} in {self._what}{hint}: {reason}")
      if used == _SENTINEL:
        raise BadImageError(
          f"Cannot read image {path} ({reason}) nor any of its {batching.NUM_FALLBACKS} "
          "fallback images: is the image folder damaged?"
        )
      self.num_skipped += 1
      logging.warning(
        "Skipped unreadable image %s (%s); used %s in its place. %d images skipped so far.",
        path,
        reason,
        self._split.path(used),
        self.num_skipped,
      )
    for k in np.flatnonzero(batch["_num_boxes"] > batch["boxes"].shape[1]):
      self.num_truncated += 1
      logging.warning(
        "Image %s has %d boxes after augmentation; kept the first max_boxes=%d. "
        "%d images truncated so far.",
        self._split.path(int(batch["_index"][k])),
        batch["_num_boxes"][k],
        batch["boxes"].shape[1],
        self.num_truncated,
      )

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._check(batch)
    return {k: v for k, v in batch.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------- public API


def train_steps_per_epoch(config: ml_collections.ConfigDict, global_batch_size: int) -> int:
  """Full global batches per epoch (the last partial one is dropped, as in the original)."""
  steps = len(coco.load_split(config, "train")) // global_batch_size
  if not steps:
    raise ValueError(
      f"the train split has fewer images than one global batch ({global_batch_size})"
    )
  return steps


def train_iterator(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> DataIterator:
  """Infinite training batches: this process's slice of global steps start_step, start_step + 1, ...

  The batch of global step s depends only on (config, s): epoch s // steps_per_epoch, shuffled with
  (config.seed, epoch). Resuming at ``start_step`` yields exactly what an uninterrupted run would.
  Each batch is a dict of numpy arrays (``data.batch_spec`` lists them) with a leading axis of
  global_batch_size // process_count, all padded to one bucket shape (H, W).
  """
  transforms.check_train_resize(config.dataset)
  _hide_accelerators_from_tf()
  pi, pc = _process(process_index, process_count)
  split = coco.load_split(config, "train")
  bucket_hw = buckets(config)
  steps = train_steps_per_epoch(config, global_batch_size)
  local = global_batch_size // pc
  first_epoch, first_step = divmod(start_step, steps)
  num_candidates = 2 if config.dataset.strict else batching.NUM_FALLBACKS + 2

  def epochs():
    for epoch in itertools.count(first_epoch):
      plan = train_epoch_plan(config, split, bucket_hw, epoch, global_batch_size)
      plan = local_plan(plan, global_batch_size, pi, pc)
      skip = first_step * local if epoch == first_epoch else 0
      yield {k: v[skip:] for k, v in plan.items()}

  slots = tf.data.Dataset.from_generator(
    epochs, output_signature=_slot_spec(num_candidates)
  ).unbatch()
  fast = config.dataset.train_resize == "fast"
  dataset = make_dataset(
    slots, _Loader(split, config.dataset.max_boxes, fast), local, config.dataset
  )
  return DataIterator(dataset, split, skip_bad=not config.dataset.strict, what="training")


def eval_iterator(
  config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  split: str = "val",
  process_index: int | None = None,
  process_count: int | None = None,
) -> DataIterator:
  """Every image of ``split`` exactly once over all processes, resized as the original's eval.

  The last global batch is completed with blank examples; ``batch["valid"]`` (B,) marks the real
  ones. A missing or undecodable image raises ``BadImageError`` naming the file.
  """
  _hide_accelerators_from_tf()
  pi, pc = _process(process_index, process_count)
  data = coco.load_split(config, split)
  if data.missing.any():
    raise BadImageError(
      f"Image {data.path(int(np.flatnonzero(data.missing)[0]))} listed in {data.ann_path} "
      f"does not exist ({int(data.missing.sum())} missing in all)"
    )
  plan = local_plan(
    eval_plan(config, data, eval_buckets(config, data), global_batch_size),
    global_batch_size,
    pi,
    pc,
  )
  slots = tf.data.Dataset.from_tensor_slices(plan)
  dataset = make_dataset(
    slots,
    _Loader(data, config.dataset.max_boxes, fast=False),
    global_batch_size // pc,
    config.dataset,
  )
  return DataIterator(dataset, data, skip_bad=False, what="evaluation")


def eval_steps(
  config: ml_collections.ConfigDict, global_batch_size: int, split: str = "val"
) -> int:
  """Global batches yielded by ``eval_iterator`` (the last one possibly part blank)."""
  data = coco.load_split(config, split)
  plan = eval_plan(config, data, eval_buckets(config, data), global_batch_size)
  return len(plan["valid"]) // global_batch_size
