"""Fixed shapes: size buckets, grouping images into batches of one bucket, host shards.

All of it is numpy on the host and a pure function of its inputs, so the batch plan of an epoch
depends on (seed, epoch) only and can be entered at any step.

Buckets: a small set of padded shapes (H, W), multiples of ``size_divisibility``. By default they
are chosen greedily to minimise the padded area of the sizes the pipeline will produce (the train
augmentation and the eval resize applied to the train images' sizes), starting from the square
envelope that holds any output. A batch is padded to the smallest-area bucket that holds all its
images; images are grouped by bucket before batching, so padding per image is small.
"""

import numpy as np

# How many later images of a fitting size a training slot may fall back on when its image cannot
# be read (see ``fallback_candidates``).
NUM_FALLBACKS = 8


def round_up(x: np.ndarray | int, multiple: int) -> np.ndarray:
  """Smallest multiple of ``multiple`` >= x."""
  return -(-np.asarray(x, np.int64) // multiple) * multiple


def envelope(buckets: np.ndarray) -> tuple[int, int]:
  """(max H, max W) over the buckets: the shape that holds every bucket's content."""
  return int(buckets[:, 0].max()), int(buckets[:, 1].max())


def derive_buckets(
  sizes: np.ndarray, max_side: int, divisibility: int, num_buckets: int
) -> np.ndarray:
  """Chooses ``num_buckets`` padded shapes for a sample of output sizes.

  The first bucket is the square (S, S), S = ``max_side`` rounded up, which holds anything. The
  others are candidates (multiples of ``divisibility`` up to S per side) chosen to minimise the
  total padded area when every size goes to its smallest fitting bucket: greedily, one at a time,
  then improved by replacing one bucket at a time with the best candidate until nothing improves.

  Args:
    sizes: (N, 2) int (h, w) output sizes (a sample of what the pipeline produces).
    max_side: the largest possible output side.
    divisibility: bucket sides are multiples of this.
    num_buckets: how many buckets (>= 1).
  Returns:
    (num_buckets', 2) int64 (H, W), sorted by area; fewer than asked if more would not help.
  """
  top = int(round_up(max_side, divisibility))
  if sizes.size and sizes.max() > top:
    raise ValueError(f"an output size {sizes.max()} exceeds the largest side {max_side}")
  # Only the grid cell of a size matters for fitting: count sizes per cell.
  cells, counts = np.unique(
    (round_up(sizes, divisibility) // divisibility).reshape(-1, 2), axis=0, return_counts=True
  )
  n = top // divisibility
  sides = np.arange(1, n + 1)
  cand = np.stack(np.meshgrid(sides, sides, indexing="ij"), -1).reshape(-1, 2)  # (C, 2) in cells
  fits = (cells[None, :, 0] <= cand[:, None, 0]) & (cells[None, :, 1] <= cand[:, None, 1])  # (C, N)
  # cell_cost[c, i]: padded area of size cell i in candidate c (inf where it does not fit).
  cell_cost = np.where(fits, (cand[:, 0] * cand[:, 1]).astype(np.float64)[:, None], np.inf)

  def best_addition(chosen: list[int]) -> tuple[int, float]:
    """The candidate that, added to ``chosen``, gives the least total; and that total."""
    current = cell_cost[chosen].min(axis=0)
    totals = np.minimum(cell_cost, current[None]) @ counts
    best = int(np.argmin(totals))
    return best, float(totals[best])

  if num_buckets > len(cells):  # enough for every size cell: each gets its own, exactly
    exact = np.unique(np.concatenate([cells, [[n, n]]]), axis=0).astype(np.int64) * divisibility
    return exact[np.argsort(exact[:, 0] * exact[:, 1], kind="stable")]
  chosen = [len(cand) - 1]  # the (n, n) square: the last candidate
  total = float(cell_cost[chosen].min(axis=0) @ counts)
  while len(chosen) < num_buckets:
    best, new_total = best_addition(chosen)
    if new_total >= total:
      break
    chosen, total = chosen + [best], new_total
  improved = True
  while improved:
    improved = False
    for j in range(1, len(chosen)):
      best, new_total = best_addition(chosen[:j] + chosen[j + 1 :])
      if new_total < total - 1e-6:
        chosen[j], total, improved = best, new_total, True
  buckets = np.unique(cand[chosen], axis=0).astype(np.int64) * divisibility
  return buckets[np.argsort(buckets[:, 0] * buckets[:, 1], kind="stable")]


def assign_buckets(sizes: np.ndarray, buckets: np.ndarray) -> np.ndarray:
  """(N,) index of the smallest-area bucket that holds each (h, w); -1 where none does."""
  area = buckets[:, 0] * buckets[:, 1]
  fits = (sizes[:, None, 0] <= buckets[None, :, 0]) & (sizes[:, None, 1] <= buckets[None, :, 1])
  masked = np.where(fits, area[None], np.iinfo(np.int64).max)
  return np.where(fits.any(1), np.argmin(masked, axis=1), -1)


def padding_waste(sizes: np.ndarray, buckets: np.ndarray) -> float:
  """Padded pixels / all pixels when each (h, w) is padded to its smallest fitting bucket."""
  b = buckets[assign_buckets(sizes, buckets)]
  return float(1 - (sizes[:, 0] * sizes[:, 1]).sum() / (b[:, 0] * b[:, 1]).sum())


def group_batches(
  sizes: np.ndarray, buckets: np.ndarray, batch_size: int
) -> tuple[list[np.ndarray], np.ndarray]:
  """Groups items, taken in the given order, into batches whose items share one bucket.

  Each item goes to the queue of its own bucket; a full queue becomes a batch. What is left in the
  queues at the end is chunked, bucket after bucket, each chunk padded to the smallest bucket that
  holds all its items (the envelope bucket always does); only the last chunk may be short.

  Args:
    sizes: (N, 2) output (h, w) of the items, in the wanted order.
    buckets: (Nb, 2) padded shapes; must contain their envelope.
    batch_size: items per batch.
  Returns:
    (batches, batch_buckets): a list of position arrays (each ``batch_size`` long but maybe the
    last), and (num_batches,) bucket index of each.
  """
  own = assign_buckets(sizes, buckets)
  if (own < 0).any():
    i = int(np.flatnonzero(own < 0)[0])
    raise ValueError(f"output size {tuple(sizes[i])} fits no bucket of {buckets.tolist()}")
  queues = [[] for _ in buckets]
  batches, batch_buckets = [], []
  for pos, b in enumerate(own):
    queues[b].append(pos)
    if len(queues[b]) == batch_size:
      batches.append(np.array(queues[b], np.int64))
      batch_buckets.append(b)
      queues[b] = []
  # Leftovers ordered by bucket (then position), so that each merged chunk needs a small bucket.
  rest = np.array([p for q in queues for p in q], np.int64)
  for start in range(0, len(rest), batch_size):
    chunk = rest[start : start + batch_size]
    hw = sizes[chunk].max(axis=0)
    batches.append(chunk)
    batch_buckets.append(int(assign_buckets(hw[None], buckets)[0]))
  return batches, np.array(batch_buckets, np.int64)


def fallback_candidates(
  positions: np.ndarray,
  slot_buckets: np.ndarray,
  sizes: np.ndarray,
  buckets: np.ndarray,
  count: int = NUM_FALLBACKS,
) -> np.ndarray:
  """For each slot, the next ``count`` items (in epoch order, cyclically) whose size fits its
  bucket.

  A training slot whose image cannot be read takes the first of these that can: the choice
  depends only on the plan, never on timing, so a resumed run makes the same substitution.

  Args:
    positions: (S,) int, the item at each slot, as a position into ``sizes``.
    slot_buckets: (S,) int, each slot's bucket index.
    sizes: (N, 2) output (h, w) of all items of the epoch, in epoch order.
    buckets: (Nb, 2).
    count: fallbacks per slot.
  Returns:
    (S, count) positions into ``sizes``.
  """
  out = np.zeros((len(positions), count), np.int64)
  for b in np.unique(slot_buckets):
    fitting = np.flatnonzero((sizes[:, 0] <= buckets[b, 0]) & (sizes[:, 1] <= buckets[b, 1]))
    slots = np.flatnonzero(slot_buckets == b)
    first = np.searchsorted(fitting, positions[slots], side="right")
    out[slots] = fitting[(first[:, None] + np.arange(count)[None]) % len(fitting)]
  return out


def local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The slots of a global batch that a process reads: a contiguous block, disjoint across
  processes."""
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
    )
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)
