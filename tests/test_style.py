"""The house style (pyproject.toml's [tool.ruff]): every Python file as ruff formats it, imports sorted."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_every_file_is_formatted():
  result = _ruff("format", "--check", ".")
  assert result.returncode == 0, f"run `ruff format .`:\n{result.stdout}{result.stderr}"


def test_imports_are_sorted():
  result = _ruff("check", ".")
  assert result.returncode == 0, f"run `ruff check --fix .`:\n{result.stdout}{result.stderr}"
