"""train.py as 2 processes x 2 CPU devices (gloo on 127.0.0.1): preemption and lost hosts.

- SIGTERM to one process, or to both: both save the same step and exit 143; a restart of both
  logs the losses of the uninterrupted two-process run.
- SIGKILL of one process (a lost host): the other prints a short message (who, the last complete
  checkpoint, "rerun the same command on every host") within the heartbeat timeout and exits 75;
  a restart resumes from that checkpoint with the uninterrupted losses.
- config.parallel='pmap' across the two processes logs the jit run's losses (dropout off).
- A process held back for longer than gloo's 30 s collective timeout (here: stopped while it
  initialises and compiles, as a loaded host is slow) does not fail the run: every process
  compiles the step, then waits for the others, before the first collective (the reference run).

All runs share one uninterrupted reference run, the tiny config and a compilation cache.
"""

import itertools
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conddetr_jax.training import checkpoint, lost_host
from tests import conftest
from tests.test_training_e2e import (
  EVERY_PROCESS_CACHES,
  TOTAL_STEPS,
  Runs,
  _free_port,
  _records,
  _train_records,
)

# Short, so a lost host is noticed quickly here; generous against false alarms on a loaded machine.
HEARTBEAT_TIMEOUT_S = 15
# How long after the SIGKILL the survivor may take to stop: the heartbeat timeout, then JAX's and
# our reporting, with a wide margin for a CPU shared with other test runs.
STOP_BOUND_S = HEARTBEAT_TIMEOUT_S + 75
SIGTERM_EXIT = 128 + signal.SIGTERM
# Longer than the 30 s after which a gloo collective fails when a process is missing from it.
HOLD_BACK_S = 45
_LAUNCHES = itertools.count()


class Pair:
  """The two processes of one multi-host train.py run, their output going to files."""

  def __init__(
    self, runs: Runs, workdir, *extra: str, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S
  ):
    self.workdir = workdir
    address = f"127.0.0.1:{_free_port()}"
    env = dict(runs.env, XLA_FLAGS=conftest.cpu_devices_xla_flags(2))
    launch = next(_LAUNCHES)
    self.logs = [f"{workdir}.{launch}.{i}.log" for i in range(2)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "w", encoding="utf-8") as out:
        self.procs.append(
          subprocess.Popen(
            [
              sys.executable,
              EVERY_PROCESS_CACHES,
              "train.py",
              *runs.flags,
              f"--workdir={workdir}",
              "--config.model.dropout=0.0",
              f"--coordinator_address={address}",
              "--num_processes=2",
              f"--process_id={i}",
              f"--heartbeat_timeout_s={heartbeat_timeout_s}",
              *extra,
            ],
            cwd=runs.env["PYTHONPATH"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )

  def output(self, i: int) -> str:
    with open(self.logs[i], encoding="utf-8", errors="replace") as f:
      return f.read()

  def wait(self, i: int, timeout: float = 600) -> int:
    try:
      return self.procs[i].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(
        f"process {i} still running after {timeout} s:\n{self.output(i)[-5000:]}"
      )

  def finish(self) -> list[int]:
    return [self.wait(i) for i in range(2)]

  def wait_until(self, done, what: str) -> None:
    """Polls ``done()`` until true; fails, naming ``what``, if a process ends first or in 600 s."""
    deadline = time.time() + 600
    while not done():
      ended = [p.poll() for p in self.procs]
      if any(code is not None for code in ended) or time.time() > deadline:
        self.kill()
        raise AssertionError(
          f"no {what} (exit codes {ended}):\n{self.output(0)[-5000:]}\n{self.output(1)[-5000:]}"
        )
      time.sleep(0.05)

  def wait_for_step(self, step: int, after: int = 0) -> None:
    """Until process 0 (which writes metrics.jsonl) has logged ``step`` or later among records
    ``after:``."""
    self.wait_until(
      lambda: any(r["step"] >= step for r in _train_records(self.workdir)[after:]), f"step {step}"
    )

  def hold_back(self, i: int, seconds: float, once_logged: str) -> None:
    """Stops process ``i`` for ``seconds`` as soon as process 0 has logged ``once_logged``, so that
    process 0 runs that much ahead of it."""
    self.wait_until(lambda: once_logged in self.output(0), repr(once_logged))
    self.procs[i].send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    self.procs[i].send_signal(signal.SIGCONT)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory.mktemp("multihost"))


@pytest.fixture(scope="module")
def reference(runs):
  """The uninterrupted two-process jit run: step -> loss.

  Process 1 is held back after the last barrier of the set-up (Orbax's, as the checkpoint manager
  starts), while both initialise the model and compile the step: process 0 must wait for it
  before the step's first collective.
  """
  pair = Pair(runs, runs.root / "reference", heartbeat_timeout_s=HOLD_BACK_S + 60)
  pair.hold_back(1, HOLD_BACK_S, once_logged="initialising the model")
  assert pair.finish() == [0, 0], pair.output(0)[-5000:] + pair.output(1)[-5000:]
  train = _train_records(pair.workdir)
  assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
  return {r["step"]: r["loss"] for r in train}


def _latest_checkpoint(workdir) -> int | None:
  return checkpoint.Checkpointer(str(workdir / "checkpoints"), 10).latest_step()


def _saved_step(output: str) -> int:
  """The step a process says it saved on SIGTERM."""
  found = re.findall(r"SIGTERM: saved step (\d+) and stopping", output)
  assert len(found) == 1, output[-5000:]
  return int(found[0])


def _sigterm(pair: Pair, targets: tuple[int, ...]) -> int:
  """SIGTERM to ``targets`` mid-run; checks both processes saved one same step and exited 143."""
  pair.wait_for_step(2)
  for i in targets:  # freeze, signal, thaw: the signal lands mid-run however fast the run is
    pair.procs[i].send_signal(signal.SIGSTOP)
    pair.procs[i].send_signal(signal.SIGTERM)
    pair.procs[i].send_signal(signal.SIGCONT)
  assert pair.finish() == [SIGTERM_EXIT] * 2, pair.output(0)[-5000:] + pair.output(1)[-5000:]
  saved = {_saved_step(pair.output(i)) for i in range(2)}
  assert len(saved) == 1
  step = saved.pop()
  assert 2 <= step < TOTAL_STEPS
  assert _latest_checkpoint(pair.workdir) == step == _train_records(pair.workdir)[-1]["step"]
  return step


def _finish(runs: Runs, workdir, *extra: str) -> int:
  """Restarts both processes to the end; returns the step they resumed from."""
  seen = len(_train_records(workdir))
  pair = Pair(runs, workdir, *extra)
  assert pair.finish() == [0, 0], pair.output(0)[-5000:] + pair.output(1)[-5000:]
  assert "AP" in _records(workdir)[-1]
  return _train_records(workdir)[seen]["step"] - 1


@pytest.mark.slow
def test_pmap_over_two_processes_stopped_by_sigterm_to_both_logs_the_losses_of_jit(
  runs, reference, tmp_path
):
  workdir = tmp_path / "pmap"
  stopped = _sigterm(Pair(runs, workdir, "--config.parallel=pmap"), targets=(0, 1))
  assert _finish(runs, workdir, "--config.parallel=pmap") == stopped
  train = _train_records(workdir)
  assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
  # The same updates as jit with dropout off; reductions run in another order.
  np.testing.assert_allclose(
    [r["loss"] for r in train], [reference[s] for s in range(1, TOTAL_STEPS + 1)], rtol=1e-5
  )


def _kill_and_check_survivor(runs: Runs, workdir, victim: int, after_step: int) -> str:
  """Restarts both processes of a run that has a checkpoint, SIGKILLs process ``victim`` once
  ``after_step`` is logged, and checks how the other one stops."""
  seen = len(_train_records(workdir))
  pair = Pair(runs, workdir)
  pair.wait_for_step(after_step, after=seen)
  pair.procs[victim].kill()
  killed_at = time.time()
  survivor = 1 - victim
  code = pair.wait(survivor, timeout=STOP_BOUND_S + 300)
  took = time.time() - killed_at
  pair.kill()
  out = pair.output(survivor)
  assert code == 75, out[
    -5000:
  ]  # the README's documented exit code, not whatever the constant says
  assert took < STOP_BOUND_S, f"stopped {took:.0f} s after the SIGKILL"
  message = out[out.index("LOST HOST") :]
  assert f"process {survivor} of 2 is stopping" in message
  assert f"the last complete checkpoint is step {_latest_checkpoint(workdir)} in " in message
  assert "Rerun the same command on every host" in message
  assert "Extension modules" not in out and "Fatal Python error" not in out  # no faulthandler dump
  return out


@pytest.mark.slow
def test_sigterm_to_one_process_then_sigkill_of_each_stop_both_and_every_restart_resumes_with_the_same_losses(  # noqa: E501
  runs, reference, tmp_path
):
  workdir = tmp_path / "faults"
  # SIGTERM to process 1 (not the one that writes metrics): both save one same step and stop.
  stopped = _sigterm(Pair(runs, workdir), targets=(1,))

  # The restart resumes there; then process 1 is lost: process 0's coordination service notices
  # the missing heartbeats.
  seen = len(_train_records(workdir))
  out = _kill_and_check_survivor(runs, workdir, victim=1, after_step=stopped + 1)
  assert _train_records(workdir)[seen]["step"] == stopped + 1
  assert "another process of the run was lost" in out
  assert re.search(r"unhealthy \(stopped sending heartbeats\):\s*1\s", out)  # JAX's line, naming it
  resume = _latest_checkpoint(workdir)
  assert resume >= stopped

  # Process 0 lost, with the coordination service it runs: process 1 notices at once.
  out = _kill_and_check_survivor(runs, workdir, victim=0, after_step=resume + 2)
  assert "process 0 was lost: the coordination service it runs at 127.0.0.1:" in out

  resume = _latest_checkpoint(workdir)
  assert _finish(runs, workdir) == resume
  train = _train_records(workdir)
  assert {r["step"] for r in train} == set(range(1, TOTAL_STEPS + 1))
  for r in train:  # on CPU a run is deterministic: steps run twice give the same loss both times
    assert r["loss"] == reference[r["step"]], r["step"]


def test_lost_host_message_names_the_lost_process_the_checkpoint_and_what_to_do():
  coordinator_gone = lost_host.lost_host_message(
    2, 4, "10.0.0.1:1234", False, "/runs/a/checkpoints", 6000
  )
  assert "process 2 of 4 is stopping: process 0 was lost" in coordinator_gone
  assert "10.0.0.1:1234" in coordinator_gone
  assert "the last complete checkpoint is step 6000 in /runs/a/checkpoints" in coordinator_gone
  assert "Rerun the same command on every host" in coordinator_gone
  other_gone = lost_host.lost_host_message(0, 4, "10.0.0.1:1234", True, "/runs/a/checkpoints", None)
  assert (
    "another process of the run was lost" in other_gone and "process 0 was lost" not in other_gone
  )
  assert "no complete checkpoint yet in /runs/a/checkpoints" in other_gone
  assert len(other_gone.strip().splitlines()) == 3


def test_every_process_of_a_test_run_writes_the_compilation_cache_as_process_0_would(monkeypatch):
  # The multi-host runs above start train.py through tests/every_process_caches.py; should JAX
  # rename what it wraps, this fails rather than the suite silently compiling twice as much.
  from jax._src import compiler, distributed  # pylint: disable=g-import-not-at-top

  from tests import every_process_caches  # pylint: disable=g-import-not-at-top

  writers = []
  monkeypatch.setattr(
    compiler,
    "_cache_write",
    lambda *args, **kwargs: writers.append(distributed.global_state.process_id),
  )
  monkeypatch.setattr(distributed.global_state, "process_id", 1)
  every_process_caches.let_every_process_write_the_cache()
  compiler._cache_write("key", 1.0, "jit_step", None, None, [])  # pylint: disable=protected-access
  assert writers == [0] and distributed.global_state.process_id == 1
