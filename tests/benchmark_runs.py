"""Runs a benchmark script as a user would, for the tests that check one end to end."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
  """``python benchmarks/<script> ARGS`` from the checkout's root, JAX on the CPU.

  Returns:
    The finished process (stdout and stderr as text).

  Raises:
    AssertionError: it exited with an error (the end of its stderr is the message).
  """
  proc = subprocess.run(
    [sys.executable, os.path.join("benchmarks", script), *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
