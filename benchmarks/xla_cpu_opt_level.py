"""What LLVM's optimisation level costs and saves on XLA:CPU: compile and step time of a train step.

Usage:
  python benchmarks/xla_cpu_opt_level.py [--config=configs/test_tiny.py] [--size=64x64] [--batch=2]
      [--levels=0,2] [--rounds=2]

The test suite compiles hundreds of small programs once each and runs most of them a few times;
tests/conftest.py compiles them at ``--xla_backend_optimization_level=0``, and
tests/test_convergence.py its 40-step run at level 2. This prints the figures behind both choices:
for each level, the compile time and median step time of ``benchmarks/train_step.py``'s step,
each in a fresh process (the level is read when the CPU backend starts; no compilation cache),
the levels alternated for ``--rounds`` rounds so that on a shared machine they see the same load.
"""

import os
import re
import statistics
import subprocess
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/test_tiny.py", "Config file of the model.")
_SIZE = flags.DEFINE_string("size", "64x64", "HxW of the padded batch.")
_BATCH = flags.DEFINE_integer("batch", 2, "Global batch size.")
_LEVELS = flags.DEFINE_list(
  "levels", ["0", "2"], "Values of --xla_backend_optimization_level (2: XLA's default)."
)
_ROUNDS = flags.DEFINE_integer(
  "rounds", 2, "Rounds; each runs every level once, in a fresh process."
)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIGURES = re.compile(r"step (?P<step>[0-9.]+)s, .* \(compile (?P<compile>[0-9.]+)s\)")


def _measure(level: str) -> tuple[float, float]:
  """(compile seconds, median step seconds) of the train step in a fresh process at ``level``."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_backend_optimization_level={level}")
  command = [
    sys.executable,
    os.path.join(_REPO, "benchmarks", "train_step.py"),
    f"--config={_CONFIG.value}",
    f"--batch={_BATCH.value}",
    f"--size={_SIZE.value}",
    "--bucket=",
    "--hf=no",
    "--steps=5",
    "--warmup=1",
  ]
  out = subprocess.run(
    command, env=env, cwd=_REPO, capture_output=True, text=True, check=True
  ).stdout
  found = _FIGURES.search(out)
  if found is None:
    raise RuntimeError(f"no step figures in benchmarks/train_step.py's output:\n{out}")
  return float(found["compile"]), float(found["step"])


def main(argv: list[str]) -> None:
  del argv
  figures: dict[str, list[tuple[float, float]]] = {level: [] for level in _LEVELS.value}
  for _ in range(_ROUNDS.value):
    for level in _LEVELS.value:
      figures[level].append(_measure(level))
  print(
    f"{_CONFIG.value} train step, batch {_BATCH.value} at {_SIZE.value}, {_ROUNDS.value} round(s), "
    f"loadavg {os.getloadavg()[0]:.1f} at the end"
  )
  for level, runs in figures.items():
    compile_s = statistics.median(c for c, _ in runs)
    step_s = statistics.median(s for _, s in runs)
    print(f"level {level}: compile {compile_s:.1f}s, step {step_s:.3f}s")


if __name__ == "__main__":
  app.run(main)
