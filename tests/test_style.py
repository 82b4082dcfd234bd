"""The house style (pyproject.toml's [tool.ruff]): every Python file as ruff formats it, imports
sorted, no line over line-length (100 columns)."""

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


def test_imports_are_sorted_and_lines_fit_the_limit():
  # The rules are pyproject.toml's [tool.ruff.lint] select: I (import order), E501 (line length).
  result = _ruff("check", ".")
  assert result.returncode == 0, (
    "run `ruff check --fix .` (sorts imports); wrap by hand the lines over line-length "
    f"(long strings, docstrings, comments):\n{result.stdout}{result.stderr}"
  )
