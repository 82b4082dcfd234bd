"""Console lines for the long silent parts of a run: compiling a step, looping over a split."""

import time
from typing import Any, Callable

from absl import logging
import jax


class Progress:
  """Logs ``<what>: 12/25 batches`` every ``every_s`` seconds and once at the end of a loop.

  Work dispatched to the devices runs asynchronously; before each line the latest result is
  waited for, so the count is of work done, not merely queued.
  """

  def __init__(
    self,
    what: str,
    total: int,
    unit: str = "images",
    every_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
  ):
    """``total``: units in the whole loop; ``clock``: seconds (a test passes a fake one)."""
    self._what, self._total, self._unit, self._every_s, self._clock = (
      what,
      total,
      unit,
      every_s,
      clock,
    )
    self._start = self._last = clock()
    logging.info("%s: %d %s...", what, total, unit)

  def update(self, done: int, latest: Any = None) -> None:
    """Records ``done`` units dispatched so far (of ``total``); ``latest``: the newest dispatched
    result (any pytree of arrays), waited for before a line is logged."""
    done = min(done, self._total)
    if done < self._total and self._clock() - self._last < self._every_s:
      return
    if latest is not None:
      jax.block_until_ready(latest)
    self._last = self._clock()
    logging.info(
      "%s: %d/%d %s (%.0f s)", self._what, done, self._total, self._unit, self._last - self._start
    )


class CompileAnnouncer:
  """Runs a step compiled ahead for each new image shape, logging that it compiles (the first step
  of each shape is slow) and how long it took.

  Compiling ahead, rather than on the first call, lets ``synchronize`` run between compiling and
  the first run: on several processes the step's collectives must start together (on CPU, a gloo
  collective whose processes arrive more than 30 s apart fails), and one process can compile for
  much longer than another (a compilation cache hit on one, a loaded host).

  ``take_compile_seconds`` hands the caller the compile time spent since its last call, to leave
  it out of the step time that throughput and ETA are computed from; ``take_flops`` the FLOPs per
  device of the steps run since its last call, where ``compile_step`` reports them.
  """

  def __init__(
    self,
    step: Callable[..., Any],
    compile_step: Callable[[Any, dict[str, Any]], float | None],
    what: str = "train step",
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[str], None] = lambda name: None,
  ):
    """
    Args:
      step: ``step(state, batch)``, a jitted step; ``batch['image']`` is (..., H, W, 3).
      compile_step: ``compile_step(state, batch)`` compiles ``step`` for these shapes without
        running it (the next ``step`` call on them runs that program) and returns the program's
        FLOPs per device, or None where the backend does not count them.
      what: the step's name in the log lines.
      clock: seconds (a test passes a fake one).
      synchronize: called with a name unique to the shape after each compile, before the first
        run; e.g. a barrier of all processes.
    """
    self._step, self._compile_step, self._what, self._clock = step, compile_step, what, clock
    self._synchronize = synchronize
    self._flops: dict[tuple[int, int], float | None] = {}  # per image shape
    self._compile_s = 0.0
    self._window_flops: float | None = 0.0

  def __call__(self, state: Any, batch: dict[str, Any]) -> Any:
    """``step(state, batch)``; the call returns once dispatched (execution is async)."""
    hw = tuple(int(d) for d in batch["image"].shape[-3:-1])
    if hw not in self._flops:
      logging.info(
        "compiling the %s for %dx%d images (the first step of each batch shape)...", self._what, *hw
      )
      start = self._clock()
      self._flops[hw] = self._compile_step(state, batch)
      seconds = self._clock() - start
      self._compile_s += seconds
      logging.info("compiled the %s for %dx%d in %.1f s", self._what, *hw, seconds)
      self._synchronize(f"{self._what} {hw[0]}x{hw[1]}".replace(" ", "_"))
    flops = self._flops[hw]
    self._window_flops = (
      None if flops is None or self._window_flops is None else self._window_flops + flops
    )
    return self._step(state, batch)

  def take_compile_seconds(self) -> float:
    """Seconds spent compiling since the last call (then reset to 0)."""
    seconds, self._compile_s = self._compile_s, 0.0
    return seconds

  def take_flops(self) -> float | None:
    """FLOPs per device of the steps run since the last call (then reset), or None when the
    program of any of them had no count."""
    flops, self._window_flops = self._window_flops, 0.0
    return flops
