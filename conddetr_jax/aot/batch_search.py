"""The largest batch that fits in a memory capacity, in few tries when each try is a costly compile.

A compiled train step's peak memory is close to affine in the batch (the state, plus the batch times
each image's activations and temporaries), so a line through two measured peaks predicts the largest
batch that fits; a try at the prediction and one at the next batch confirm it. The prediction only
chooses what to try: the answer is always verified (``b`` tried and fits, ``b + 1`` tried and does
not, unless ``b`` is the cap), and when the peaks are not affine the search falls back to doubling
and bisection, so it stays exact and its tries stay logarithmic. ``fits`` must be monotone (if ``n``
fits, every smaller batch fits), as for a doubling-and-bisection search.
"""

import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class BatchTry:
  """The outcome of trying one batch.

  Attributes:
    fits: whether the program fits the capacity at this batch.
    peak_bytes: its peak memory: the compiled peak, or for a program the compiler refused the memory
      the compiler said it needs; None when unknown (the try still bounds the search, but no line
      goes through it).
    capacity_bytes: the capacity the try was held against, when it says (the TPU compiler's refusal
      names the HBM it may use, a little under the chip's nominal capacity); the search then aims at
      it.
  """

  fits: bool
  peak_bytes: float | None = None
  capacity_bytes: float | None = None


# Why a batch is tried, as handed to ``try_batch`` (for the user's log).
START = "the start"
DOUBLING = "doubling"
BISECTION = "bisection"


def _line_through(
  points: dict[int, float], capacity: float, good: int, bad: int
) -> tuple[float, int, int] | None:
  """Where the line through two measured peaks reaches ``capacity``: (batch, n1, n2), or None.

  The two points nearest the boundary: the largest fitting batch and the smallest failing one when
  both have known peaks (interpolation across the boundary), else the two largest fitting batches
  (or the two smallest failing ones). Near the boundary the line follows the peaks' local growth,
  which matters when they are not quite affine (a train step's grow a little slower at larger
  batches).
  """
  below = sorted(n for n in points if n <= good)
  above = sorted(n for n in points if n >= bad)
  if below and above:
    n1, n2 = below[-1], above[0]
  elif len(below) >= 2:
    n1, n2 = below[-2:]
  elif len(above) >= 2:
    n1, n2 = above[:2]
  else:
    return None
  slope = (points[n2] - points[n1]) / (n2 - n1)
  if not slope > 0:  # flat or falling: no crossing to predict
    return None
  at = n1 + (capacity - points[n1]) / slope
  return (at, n1, n2) if math.isfinite(at) else None


def largest_fitting_batch(
  try_batch: Callable[[int, str], BatchTry],
  capacity_bytes: float,
  *,
  start: int = 1,
  limit: int = 4096,
) -> int:
  """The largest batch ``b`` in [1, ``limit``] that fits, 0 if 1 does not; each batch is tried at
  most once.

  Args:
    try_batch: ``try_batch(n, why) -> BatchTry``; ``why`` says why ``n`` is tried (``START``,
      ``DOUBLING``, ``BISECTION``, or the prediction, e.g. "the line through the peaks at 2 and 4
      reaches the capacity at 19.4", or "to confirm: ..." for the batch next to a predicted
      boundary), for the caller's log.
    capacity_bytes: the capacity the predictions aim at (``try_batch`` decides what fits); lowered
      to a capacity a try reports, or to the peak of a batch that did not fit.
    start: the first batch tried (e.g. one already compiled, which the caller answers from a cache).
    limit: the largest batch the search tries.

  Returns:
    ``b``, verified: ``try_batch(b)`` fitted (unless b == 0) and ``try_batch(b + 1)`` did not
    (unless b == ``limit``).
  """
  if limit < 1:
    raise ValueError(f"limit={limit}: the search needs at least batch 1")
  good, bad = 0, limit + 1  # the largest batch known to fit, the smallest known not to
  peaks: dict[int, float] = {}
  target = float(capacity_bytes)  # the peak the predictions aim at

  def measure(n: int, why: str) -> None:
    nonlocal good, bad, target
    result = try_batch(n, why)
    if result.capacity_bytes is not None:
      target = min(target, float(result.capacity_bytes))
    peak = result.peak_bytes
    if peak is not None and math.isfinite(peak):
      peaks[n] = float(peak)
      # What fits is what try_batch says: a peak that did not fit is above the real threshold, one
      # that fitted is not.
      target = min(target, float(peak)) if not result.fits else max(target, float(peak))
    if result.fits:
      good = max(good, n)
    else:
      bad = min(bad, n)

  measure(min(max(start, 1), limit), START)
  predicted_in_a_row, progress_mark = 0, (good, bad)
  while bad - good > 1:
    candidate, why = None, ""
    if predicted_in_a_row < 2:
      line = _line_through(peaks, target, good, bad)
      if line is not None:
        at, n1, n2 = line
        # The crossing's floor should fit and the batch after it should not: try whichever is
        # unknown.
        candidate = min(max(math.floor(at), good + 1), bad - 1)
        line_says = f"the line through the peaks at {n1} and {n2} reaches the capacity at {at:.1f}"
        why = line_says if candidate == math.floor(at) else f"to confirm: {line_says}"
    if candidate is None:
      if bad > limit:
        candidate, why = min(2 * good, limit), DOUBLING
      else:
        candidate, why = (good + bad) // 2, BISECTION
      predicted_in_a_row, progress_mark = 0, (good, bad)
    else:
      predicted_in_a_row += 1
    measure(candidate, why)
    if predicted_in_a_row == 2:
      # Two predictions in a row must have done at least what a doubling or bisection step would
      # (doubled the fitting batch while no upper bound is known, else halved the interval); if not,
      # the peaks are not affine here and the next try is a doubling or bisection step.
      old_good, old_bad = progress_mark
      if old_bad > limit and bad > limit:
        progressed = good >= 2 * old_good
      else:
        progressed = bad - good <= (min(old_bad, limit + 1) - old_good) / 2
      if progressed:
        predicted_in_a_row, progress_mark = 0, (good, bad)
  return good
