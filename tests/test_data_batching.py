"""Size buckets, grouping into one-bucket batches, fallbacks and host shards (numpy only)."""

import numpy as np
import pytest

from conddetr_jax.data import batching


def test_round_up_to_multiples():
  np.testing.assert_array_equal(batching.round_up([1, 64, 65, 1333], 64), [64, 64, 128, 1344])


def test_assign_buckets_picks_the_smallest_area_that_holds_the_size():
  buckets = np.array([[64, 128], [128, 64], [128, 128], [192, 192]])
  sizes = np.array([[60, 100], [100, 60], [64, 128], [65, 100], [150, 30], [200, 10]])
  np.testing.assert_array_equal(batching.assign_buckets(sizes, buckets), [0, 1, 0, 2, 3, -1])


def test_padding_waste_counts_padded_pixels():
  buckets = np.array([[100, 100]])
  assert batching.padding_waste(np.array([[50, 100], [100, 100]]), buckets) == pytest.approx(0.25)


def test_derived_buckets_are_few_multiples_that_hold_everything_and_cut_padding():
  rng = np.random.default_rng(0)
  landscape = np.stack([rng.integers(480, 801, 3000), rng.integers(640, 1067, 3000)], -1)
  sizes = np.concatenate([landscape, landscape[:1000, ::-1]])
  buckets = batching.derive_buckets(sizes, 1333, 64, 6)
  assert len(buckets) == 6 and (buckets % 64 == 0).all()
  assert [1344, 1344] in buckets.tolist()  # the square envelope holds any output
  assert (batching.assign_buckets(sizes, buckets) >= 0).all()
  square = np.array([[1344, 1344]])
  assert batching.padding_waste(sizes, buckets) < 0.5 * batching.padding_waste(sizes, square)


def test_derived_buckets_stop_when_more_would_not_help():
  sizes = np.array([[64, 64]] * 10)
  np.testing.assert_array_equal(batching.derive_buckets(sizes, 128, 64, 5), [[64, 64], [128, 128]])


def test_derive_buckets_rejects_sizes_beyond_the_largest_side():
  with pytest.raises(ValueError, match="exceeds"):
    batching.derive_buckets(np.array([[200, 10]]), 128, 64, 3)


def test_group_batches_gives_full_one_bucket_batches_then_merged_leftovers():
  buckets = np.array([[64, 64], [64, 128], [128, 128]])
  # Items: A = fits (64, 64), B = needs (64, 128).
  sizes = np.array([[60, 60], [60, 100], [60, 60], [60, 60], [60, 100], [60, 60], [60, 100]])
  batches, bb = batching.group_batches(sizes, buckets, batch_size=3)
  assert [b.tolist() for b in batches] == [[0, 2, 3], [1, 4, 6], [5]]
  np.testing.assert_array_equal(bb, [0, 1, 0])
  for batch, b in zip(batches, bb):
    assert (sizes[batch] <= buckets[b]).all()


def test_group_batches_merges_leftovers_of_different_buckets_into_one_that_holds_both():
  buckets = np.array([[64, 128], [128, 64], [128, 128]])
  sizes = np.array([[60, 100], [100, 60]])
  batches, bb = batching.group_batches(sizes, buckets, batch_size=2)
  assert [b.tolist() for b in batches] == [[0, 1]]
  np.testing.assert_array_equal(bb, [2])


def test_group_batches_keeps_every_item_once():
  rng = np.random.default_rng(3)
  buckets = batching.derive_buckets(rng.integers(10, 200, size=(500, 2)), 200, 32, 5)
  sizes = rng.integers(10, 200, size=(997, 2))
  batches, bb = batching.group_batches(sizes, buckets, batch_size=8)
  flat = np.concatenate(batches)
  np.testing.assert_array_equal(np.sort(flat), np.arange(997))
  assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 997 % 8
  for batch, b in zip(batches, bb):
    assert (sizes[batch] <= buckets[b]).all()


def test_fallback_candidates_are_the_next_items_that_fit_the_slot_bucket():
  buckets = np.array([[64, 64], [128, 128]])
  sizes = np.array([[60, 60], [100, 100], [60, 60], [100, 100], [50, 50]])
  positions = np.array([0, 1])
  slot_buckets = np.array([0, 1])
  out = batching.fallback_candidates(positions, slot_buckets, sizes, buckets, count=3)
  np.testing.assert_array_equal(out[0], [2, 4, 0])  # only small items fit (64, 64); cyclic
  np.testing.assert_array_equal(out[1], [2, 3, 4])  # everything fits (128, 128)


def test_local_slices_are_disjoint_and_cover_the_global_batch():
  covered = np.concatenate([np.arange(12)[batching.local_slice(12, p, 3)] for p in range(3)])
  np.testing.assert_array_equal(covered, np.arange(12))
  with pytest.raises(ValueError, match="divisible"):
    batching.local_slice(10, 0, 3)
