"""Train/eval iterators on the synthetic dataset: shapes, shards, resume, eval coverage, buckets."""

import json

import ml_collections
import numpy as np
import pytest

from conddetr_jax import data
from conddetr_jax.data import batch_spec, batching, coco, pipeline, transforms
from configs import default


def small_config(root: str, **dataset) -> ml_collections.ConfigDict:
  """The default config shrunk to tiny images (every size comes from here)."""
  config = default.get_config()
  config.dataset.update(
    dict(
      source="synthetic",
      synthetic_dir=root,
      synthetic_num_train=40,
      synthetic_num_val=23,
      synthetic_image_size=(48, 80),
      train_scales=(32, 40, 48),
      train_max_size=64,
      crop_resize_scales=(36, 44),
      crop_min_size=24,
      crop_max_size=40,
      eval_size=48,
      eval_max_size=64,
      size_divisibility=16,
      num_buckets=4,
      num_parallel_calls=2,
    )
  )
  config.dataset.update(dataset)
  return config


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ml_collections.ConfigDict:
  config = small_config(str(tmp_path_factory.mktemp("synthetic")))
  data.prepare_dataset(config)
  return config


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def test_train_batches_have_the_documented_shapes_and_dtypes(config):
  buckets = data.buckets(config).tolist()
  ids = set(coco.load_split(config, "train").image_ids.tolist())
  for batch in take(
    data.train_iterator(config, global_batch_size=4, process_index=0, process_count=1), 6
  ):
    b, h, w, _ = batch["image"].shape
    assert b == 4 and [h, w] in buckets
    assert batch_spec.layout(batch) == batch_spec.train_batch(4, (h, w), config.dataset.max_boxes)
    assert batch["valid"].all() and set(batch["image_id"].tolist()) <= ids
    for i in range(4):
      sh, sw = batch["size"][i]
      assert not batch["pad_mask"][i, :sh, :sw].any() and batch["pad_mask"][i, sh:].all()
      assert batch["pad_mask"][i, :, sw:].all()
      assert (batch["image"][i][batch["pad_mask"][i]] == 0).all()
      boxes = batch["boxes"][i][batch["box_valid"][i]]
      assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
      assert set(batch["labels"][i][batch["box_valid"][i]].tolist()) <= {2, 5, 7, 9}
      assert not batch["box_valid"][
        i, batch["box_valid"][i].sum() :
      ].any()  # valid boxes come first


def test_num_classes_and_names_follow_the_non_contiguous_ids(config):
  assert data.num_classes(config) == 10
  assert data.category_names(config) == {2: "square", 5: "disc", 7: "triangle", 9: "cross"}
  assert data.annotation_path(config, "val").endswith("annotations/instances_val2017.json")


def test_shards_are_disjoint_and_together_the_global_batch(config):
  whole = take(
    data.train_iterator(config, global_batch_size=8, process_index=0, process_count=1), 3
  )
  parts = [
    take(data.train_iterator(config, global_batch_size=8, process_index=p, process_count=2), 3)
    for p in range(2)
  ]
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key]
      )
    assert not set(parts[0][step]["image_id"]) & set(parts[1][step]["image_id"])


def test_an_epoch_shows_each_image_at_most_once(config):
  steps = data.train_steps_per_epoch(config, 8)
  assert steps == 40 // 8
  ids = np.concatenate(
    [
      b["image_id"]
      for b in take(
        data.train_iterator(config, global_batch_size=8, process_index=0, process_count=1), steps
      )
    ]
  )
  assert len(ids) == 40 and len(set(ids.tolist())) == 40


@pytest.mark.parametrize("train_resize", transforms.TRAIN_RESIZE_MODES)
def test_resume_at_any_step_gives_the_same_batches(config, train_resize):
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.train_resize = train_resize

  def run(start, n):
    return take(
      data.train_iterator(
        config, global_batch_size=8, start_step=start, process_index=0, process_count=1
      ),
      n,
    )

  uninterrupted = run(0, 8)  # 5 steps per epoch: crosses into epoch 1
  resumed = run(3, 5)
  for a, b in zip(uninterrupted[3:], resumed):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_train_resize_modes_differ_only_in_pixels(config):
  fast = next(data.train_iterator(config, global_batch_size=8, process_index=0, process_count=1))
  other = ml_collections.ConfigDict(config.to_dict())
  other.dataset.train_resize = "pil"
  pil = next(data.train_iterator(other, global_batch_size=8, process_index=0, process_count=1))
  for key in ("image_id", "size", "pad_mask", "labels", "box_valid"):
    np.testing.assert_array_equal(fast[key], pil[key])
  # The fast path rounds each crop edge to a source pixel: a box coordinate moves by at most half a
  # pixel plus the half its window edge moved, over a window of at least crop_min_size source
  # pixels.
  np.testing.assert_allclose(fast["boxes"], pil["boxes"], atol=1 / config.dataset.crop_min_size)
  assert 0 < np.abs(fast["image"] - pil["image"]).mean() < 0.1

  # PIL's path resizes to 8 bits; the fast one resizes in float, so most of its values fall between.
  def off_grey_levels(batch):
    grey = (
      batch["image"][~batch["pad_mask"]] * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN
    ) * 255
    return np.mean(np.abs(grey - np.round(grey)) > 1e-3)

  assert off_grey_levels(pil) == 0 and off_grey_levels(fast) > 0.5


def test_an_unknown_train_resize_is_refused_naming_the_field(config):
  other = ml_collections.ConfigDict(config.to_dict())
  other.dataset.train_resize = "bilinear"
  with pytest.raises(
    ValueError, match=r"^config.dataset.train_resize='bilinear': expected one of \('fast', 'pil'\)$"
  ):
    data.train_iterator(other, global_batch_size=8, process_index=0, process_count=1)


def test_order_depends_on_the_seed_and_the_epoch(config):
  def ids(cfg, start):
    it = data.train_iterator(
      cfg, global_batch_size=8, start_step=start, process_index=0, process_count=1
    )
    return np.concatenate([b["image_id"] for b in take(it, 5)]).tolist()

  other = ml_collections.ConfigDict(config.to_dict())
  other.seed = config.seed + 1
  epoch0, epoch1 = ids(config, 0), ids(config, 5)
  assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
  assert ids(other, 0) != epoch0


@pytest.mark.parametrize("global_batch_size, process_count", [(7, 1), (6, 2)])
def test_eval_yields_every_image_exactly_once(config, global_batch_size, process_count):
  split = coco.load_split(config, "val")
  assert len(split) % global_batch_size
  per_process = []
  for p in range(process_count):
    batches = list(
      data.eval_iterator(
        config, global_batch_size=global_batch_size, process_index=p, process_count=process_count
      )
    )
    assert len(batches) == data.eval_steps(config, global_batch_size)
    assert all(b["image"].shape[0] == global_batch_size // process_count for b in batches)
    per_process.append(batches)
  ids = [i for batches in per_process for b in batches for i in b["image_id"][b["valid"]].tolist()]
  assert sorted(ids) == sorted(split.image_ids.tolist())
  padded = [b["image_id"][~b["valid"]] for batches in per_process for b in batches]
  assert (np.concatenate(padded) == -1).all()
  assert sum(len(p) for p in padded) == data.eval_steps(
    config, global_batch_size
  ) * global_batch_size - len(split)


def test_eval_boxes_are_the_json_boxes_in_the_resized_image(config):
  with open(data.annotation_path(config, "val")) as f:
    content = json.load(f)
  by_image = {}
  for a in content["annotations"]:
    by_image.setdefault(a["image_id"], []).append(a["bbox"])
  batch = next(data.eval_iterator(config, global_batch_size=4, process_index=0, process_count=1))
  for i in range(4):
    (oh, ow), (sh, sw) = batch["orig_size"][i], batch["size"][i]
    assert min(sh, sw) == 48 or max(sh, sw) <= 64  # the eval resize of this config
    cx, cy, w, h = batch["boxes"][i][batch["box_valid"][i]].T
    # Back to xywh in the original image: the resize scales each axis by size / orig_size.
    xywh = np.stack([(cx - w / 2) * ow, (cy - h / 2) * oh, w * ow, h * oh], -1)
    np.testing.assert_allclose(xywh, by_image[int(batch["image_id"][i])], atol=1e-3)


def test_train_and_eval_share_the_bucket_set(config):
  buckets = data.buckets(config).tolist()
  seen = set()
  for batch in data.eval_iterator(config, global_batch_size=4, process_index=0, process_count=1):
    seen.add(tuple(batch["image"].shape[1:3]))
  for batch in take(
    data.train_iterator(config, global_batch_size=4, process_index=0, process_count=1), 10
  ):
    seen.add(tuple(batch["image"].shape[1:3]))
  assert all(list(s) in buckets for s in seen)
  assert len(buckets) <= config.dataset.num_buckets and all(b % 16 == 0 for s in buckets for b in s)


def test_eval_num_buckets_pads_each_image_only_to_the_size_divisibility(config):
  fine = small_config(config.dataset.synthetic_dir, eval_num_buckets=1000)
  split = coco.load_split(fine, "val")
  out = transforms.eval_geometry(split.sizes, fine.dataset)[:, 7:9]
  own = -(-out // 16) * 16  # each image's size rounded up to size_divisibility
  assert {tuple(b) for b in pipeline.eval_buckets(fine, split).tolist()} >= {
    tuple(s) for s in own.tolist()
  }
  for batch in data.eval_iterator(fine, global_batch_size=1, process_index=0, process_count=1):
    index = np.flatnonzero(split.image_ids == batch["image_id"][0])[0]
    assert tuple(batch["image"].shape[1:3]) == tuple(own[index])
  np.testing.assert_array_equal(
    pipeline.eval_buckets(config, split), data.buckets(config)
  )  # 0: shared
  # A bounded number: at most eval_num_buckets shapes (+ the envelope square), every image fits.
  few = pipeline.eval_buckets(small_config(config.dataset.synthetic_dir, eval_num_buckets=2), split)
  assert len(few) <= 2 and (batching.assign_buckets(out, few) >= 0).all()


def test_explicit_buckets_are_used_with_their_envelope(tmp_path, config):
  explicit = small_config(config.dataset.synthetic_dir, buckets=((48, 64), (64, 48)))
  np.testing.assert_array_equal(pipeline.buckets(explicit), [[48, 64], [64, 48], [64, 64]])
  for batch in take(
    data.train_iterator(explicit, global_batch_size=4, process_index=0, process_count=1), 4
  ):
    assert list(batch["image"].shape[1:3]) in [[48, 64], [64, 48], [64, 64]]


def test_prepare_is_idempotent_and_refuses_other_parameters(config):
  data.prepare_dataset(config)  # already there: nothing to do
  other = small_config(config.dataset.synthetic_dir, synthetic_num_train=41)
  with pytest.raises(ValueError, match="already holds"):
    data.prepare_dataset(other)


def test_inspect_draws_the_batch_with_boxes(config, tmp_path):
  from conddetr_jax.data import inspect_batches  # pylint: disable=g-import-not-at-top

  batch = next(data.train_iterator(config, global_batch_size=4, process_index=0, process_count=1))
  picture = inspect_batches.render_batch(batch, data.category_names(config), columns=2)
  _, h, w, _ = batch["image"].shape
  assert picture.size == (2 * w, 2 * h)
  pixels = np.asarray(picture)
  cx, cy, bw, bh = batch["boxes"][0, 0] * np.tile(batch["size"][0][::-1], 2)
  x1, y1 = int(round(cx - bw / 2)), int(round(cy - bh / 2))
  colour = inspect_batches._colour(int(batch["labels"][0, 0]))  # pylint: disable=protected-access
  region = pixels[max(y1 - 1, 0) : y1 + 2, max(x1 - 1, 0) : x1 + 2].reshape(-1, 3)
  assert (region == colour).all(axis=1).any()  # the first box's outline is drawn at its corner
