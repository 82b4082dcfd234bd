"""Atomic file writes: several processes (hosts sharing a folder) may write the same dataset."""

import os


def write_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary name and a rename, so that a reader never sees
  a partial file, even while another process writes the same path."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
