"""Local files: atomic writes (several hosts sharing a folder may write the same dataset), and the
check that a path is local, since the code reads and writes through the local file system."""

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def write_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary name and a rename, so that a reader never sees
  a partial file, even while another process writes the same path."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def require_local_path(path: str, what: str) -> None:
  """Raises ``ValueError`` naming ``what`` if ``path`` is a URL (``gs://``, ``s3://``, ...).

  Without this, ``os.path`` would take ``gs://bucket/run`` for a relative folder ``gs:/bucket/run``
  and write there silently.
  """
  if _URL.match(path):
    raise ValueError(
      f"{what}={path!r}: remote paths are not supported; mount the bucket (for example "
      "with gcsfuse) and give its local path"
    )
