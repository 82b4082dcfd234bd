"""``pip install .`` builds: the wheel carries the package, its configs and its commands, and
imports from a folder outside the checkout (no network: the build uses the installed setuptools)."""

import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (
  "pyproject.toml",
  "README.md",
  "requirements.txt",
  "conddetr_jax",
  "configs",
  "train.py",
  "eval.py",
  "predict.py",
)
COMMANDS = (
  "conddetr-train",
  "conddetr-eval",
  "conddetr-predict",
  "conddetr-aot",
  "conddetr-convert",
  "conddetr-export",
)


def test_the_wheel_installs_and_imports_outside_the_checkout(tmp_path):
  source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
  source.mkdir()
  for name in SOURCES:
    if os.path.isdir(
      os.path.join(REPO, name)
    ):  # links kept: the package links configs/ and the scripts
      shutil.copytree(
        os.path.join(REPO, name),
        source / name,
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
      )
    else:
      shutil.copy2(os.path.join(REPO, name), source / name)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      "-q",
      "-w",
      str(tmp_path / "dist"),
      str(source),
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  (wheel,) = (tmp_path / "dist").iterdir()
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  assert {
    "conddetr_jax/configs/demo.py",
    "conddetr_jax/configs/r50.py",
    "conddetr_jax/commands/train.py",
    "conddetr_jax/commands/predict.py",
    "conddetr_jax/inference/api.py",
  } <= names
  assert all(f"{command} = conddetr_jax.commands:" in entry_points for command in COMMANDS)

  site = tmp_path / "site"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "--no-deps",
      "--no-index",
      "-q",
      "--target",
      str(site),
      str(wheel),
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  code = (
    "import conddetr_jax, conddetr_jax.configs.r50 as r50; "
    "print(conddetr_jax.__file__); print(r50.get_config().global_batch_size)"
  )
  env = dict(os.environ, PYTHONPATH=str(site))
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == [str(site / "conddetr_jax" / "__init__.py"), "16"]
  assert all((site / "bin" / command).is_file() for command in COMMANDS)
