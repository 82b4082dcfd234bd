"""The commands and scripts a test starts in a process of its own: how they are started, once."""

from collections.abc import Mapping, Sequence
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(**extra: str) -> dict[str, str]:
  """This process's environment with JAX on the CPU and TensorFlow's logs off, plus ``extra``."""
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **extra)


def libtpu_env() -> dict[str, str] | None:
  """The environment of a process that finds libtpu: this one's if it is installed here, else with
  ``$CONDDETR_LIBTPU_PATH`` (where .ci/run installs it) on PYTHONPATH; None if neither has it."""
  if importlib.util.find_spec("libtpu") is not None:
    return dict(os.environ)
  folder = os.environ.get("CONDDETR_LIBTPU_PATH")
  if folder and os.path.isdir(os.path.join(folder, "libtpu")):
    return dict(
      os.environ, PYTHONPATH=os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    )
  return None


def run_python(
  *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
  """Runs ``python *args`` in the checkout's root and returns it with its output as text.

  Args:
    *args: the interpreter's arguments: a script and its flags, ``-m`` and a module, or ``-c``.
    env: the process's environment; None: this process's.
    timeout: seconds before the process is killed and the test fails.
  """
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


def run_python_ok(
  *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
  """``run_python`` that fails the test, showing the end of stderr, unless the process exits 0."""
  proc = run_python(*args, env=env, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def run_python_together(
  argvs: Sequence[Sequence[str]], env: Mapping[str, str], timeout: float
) -> list[subprocess.CompletedProcess]:
  """Starts ``python *argv`` for every argv at once (the processes of one multi-process run).

  Returns:
    Each process, finished, with its stdout and stderr as text, in the order of ``argvs``.
  """
  procs = [
    subprocess.Popen(
      [sys.executable, *argv],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for argv in argvs
  ]
  finished = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=timeout)
    finished.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
  return finished
