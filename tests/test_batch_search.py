"""The largest-batch search (conddetr_jax.aot.batch_search) against fake peak functions: no
compiling."""

import math

import numpy as np
import pytest

from conddetr_jax.aot.batch_search import BatchTry, largest_fitting_batch

GIB = 2**30


class FakeCompiler:
  """Answers tries from a peak function, records them, and fails a test that tries a batch twice.

  A batch whose peak exceeds ``refuse_above`` is refused as the TPU compiler refuses it: it does not
  fit, and only if ``say_needed`` is its peak reported, with the compiler's capacity (the compiler's
  "Used 17.52G of 15.75G hbm"); ``capacity`` is the nominal one a compiled peak is held against.
  """

  def __init__(self, peak, capacity, refuse_above=math.inf, say_needed=True):
    self.peak, self.capacity, self.refuse_above, self.say_needed = (
      peak,
      capacity,
      refuse_above,
      say_needed,
    )
    self.tried: dict[int, bool] = {}
    self.reasons: list[str] = []

  def __call__(self, n: int, why: str) -> BatchTry:
    assert n not in self.tried, f"batch {n} tried twice"
    assert 1 <= n, n
    p = self.peak(n)
    fits = p <= self.capacity and p <= self.refuse_above
    self.tried[n] = fits
    self.reasons.append(why)
    if p > self.refuse_above:
      return BatchTry(False, *((p, self.refuse_above) if self.say_needed else (None, None)))
    return BatchTry(fits, p)

  def brute_force(self, limit: int) -> int:
    return max(
      [n for n in range(1, limit + 1) if self.peak(n) <= min(self.capacity, self.refuse_above)],
      default=0,
    )

  def assert_verified(self, answer: int, limit: int) -> None:
    """The answer is a checked fact: it was tried and fits, and the next batch was tried and does
    not."""
    if answer > 0:
      assert self.tried[answer] is True
    if answer < limit:
      assert self.tried[answer + 1] is False


@pytest.mark.parametrize(
  "compiler_capacity_gib, max_tries",
  [
    (
      16,
      4,
    ),  # the start, one more point for the line (doubling), its prediction, and the batch after it
    (
      15.75,
      5,
    ),  # as on a v5e: the search aims at 16 GiB, the compiler refuses above 15.75 GiB and says so
  ],
)
@pytest.mark.parametrize(
  "state_gib, per_image_gib, start",
  [(0.51, 0.8, 1), (0.51, 0.8, 2), (0.72, 6.6, 2), (2.0, 0.013, 1), (0.3, 1.0, 4), (1.0, 0.75, 3)],
)
def test_affine_peaks_take_few_tries(
  state_gib, per_image_gib, start, compiler_capacity_gib, max_tries
):
  compiler = FakeCompiler(
    lambda n: (state_gib + per_image_gib * n) * GIB,
    16 * GIB,
    refuse_above=compiler_capacity_gib * GIB,
  )
  answer = largest_fitting_batch(compiler, 16 * GIB, start=start, limit=4096)
  assert answer == compiler.brute_force(4096)
  compiler.assert_verified(answer, 4096)
  assert len(compiler.tried) <= max_tries, compiler.tried
  assert any("line through the peaks" in why for why in compiler.reasons)


def test_an_affine_peak_landing_exactly_on_the_capacity_fits():
  compiler = FakeCompiler(lambda n: 1.0 + 0.5 * n, 10.0)  # 18 reaches 10.0 exactly
  assert largest_fitting_batch(compiler, 10.0, start=2) == 18
  compiler.assert_verified(18, 4096)
  assert len(compiler.tried) <= 5


def test_the_measured_r50_peaks_on_v5e_need_fewer_compiles_than_doubling_and_bisection():
  # R50 bf16 800x1216 on v5e:2x2, per chip (docs/accelerators.md): peaks in GiB as compiled, the
  # compiler's "needed" figure for the larger batches it refused; between them, linear
  # interpolation.
  measured = {
    1: 1.70,
    2: 2.84,
    4: 4.83,
    8: 7.95,
    16: 14.81,
    18: 14.71,
    19: 15.63,
    20: 16.05,
    24: 19.2,
    32: 25.6,
  }
  xs = sorted(measured)
  compiler = FakeCompiler(
    lambda n: float(np.interp(n, xs, [measured[x] for x in xs])), 16.0, refuse_above=15.75
  )
  answer = largest_fitting_batch(compiler, 16.0, start=2)
  assert answer == 19
  compiler.assert_verified(19, 4096)
  assert (
    len(compiler.tried) <= 6
  )  # doubling then bisection took 10 (1, 2, 4, 8, 16, 32, 24, 20, 18, 19)


@pytest.mark.parametrize("say_needed", [True, False])
@pytest.mark.parametrize(
  "step, per_step, capacity", [(8, 3.0, 16.0), (5, 2.0, 16.0), (64, 1.0, 12.5), (3, 7.0, 16.0)]
)
def test_step_shaped_peaks_still_give_the_exact_answer_in_logarithmic_tries(
  step, per_step, capacity, say_needed
):
  peak = lambda n: 1.0 + per_step * math.ceil(n / step)  # memory grows in blocks of `step` batches
  compiler = FakeCompiler(peak, capacity, refuse_above=capacity, say_needed=say_needed)
  answer = largest_fitting_batch(compiler, capacity, start=1, limit=4096)
  assert answer == compiler.brute_force(4096)
  compiler.assert_verified(answer, 4096)
  assert len(compiler.tried) <= 3 * 13, len(
    compiler.tried
  )  # log2(4096) = 12 per doubling/bisection phase


def test_random_monotone_peaks_give_the_exact_answer():
  rng = np.random.default_rng(0)
  for _ in range(200):
    limit = int(rng.integers(1, 300))
    steps = rng.exponential(1.0, size=limit + 2) * (
      rng.random(limit + 2) < rng.random()
    )  # flat stretches and jumps
    cumulative = np.cumsum(steps) + rng.random()
    capacity = float(rng.uniform(0, cumulative[-1] * 1.2))
    compiler = FakeCompiler(
      lambda n: float(cumulative[n]), capacity, say_needed=bool(rng.random() < 0.5)
    )
    answer = largest_fitting_batch(
      compiler, capacity, start=int(rng.integers(1, limit + 1)), limit=limit
    )
    assert answer == compiler.brute_force(limit)
    compiler.assert_verified(answer, limit)
    assert len(compiler.tried) <= 3 * (math.log2(limit) + 2) + 2, (limit, len(compiler.tried))


def test_when_batch_1_does_not_fit_the_answer_is_0():
  compiler = FakeCompiler(lambda n: 20.0 + n, 16.0)
  assert largest_fitting_batch(compiler, 16.0, start=1) == 0
  assert compiler.tried == {1: False}
  compiler = FakeCompiler(lambda n: 20.0 + n, 16.0)
  assert largest_fitting_batch(compiler, 16.0, start=4) == 0
  assert compiler.tried[1] is False and len(compiler.tried) <= 3


def test_a_start_that_does_not_fit_searches_below_it():
  compiler = FakeCompiler(lambda n: 2.0 + 4.5 * n, 16.0)
  assert largest_fitting_batch(compiler, 16.0, start=8) == 3
  compiler.assert_verified(3, 4096)


def test_a_huge_capacity_stops_at_the_cap_in_few_tries():
  compiler = FakeCompiler(lambda n: 0.5 + 1e-6 * n, 95.0)
  assert largest_fitting_batch(compiler, 95.0, start=2, limit=512) == 512
  assert compiler.tried[512] is True and len(compiler.tried) <= 3
  nearly_flat = FakeCompiler(lambda n: 1e-310 * n, 16.0)  # a line whose crossing overflows a float
  assert largest_fitting_batch(nearly_flat, 16.0, start=1, limit=100) == 100
  flat = FakeCompiler(
    lambda n: 3.0, 16.0
  )  # a peak that does not grow: no line crosses, doubling does
  assert largest_fitting_batch(flat, 16.0, start=1, limit=100) == 100
  assert len(flat.tried) <= 9


def test_a_cap_below_the_start_is_respected():
  compiler = FakeCompiler(lambda n: float(n), 1000.0)
  assert largest_fitting_batch(compiler, 1000.0, start=64, limit=10) == 10
  assert max(compiler.tried) == 10
  with pytest.raises(ValueError, match="limit=0"):
    largest_fitting_batch(compiler, 1000.0, limit=0)
