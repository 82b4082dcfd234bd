"""Paths that are local or in cloud storage (``gs://``, ...): the one way the code touches files.

Every path a user gives (the workdir, checkpoints, ``config.init_from``, the dataset, images to
predict on, ``--out``) becomes an ``etils.epath.Path`` here; local paths behave as ``pathlib``.
Who moves the bytes of ``gs://``:
  * Orbax's arrays: TensorStore (its own GCS client; ``TENSORSTORE_GCS_HTTP_URL`` points it at an
    emulator).
  * Everything else (Orbax's directories, json, metrics, TensorBoard events, images): gcsfs through
    epath. epath would pick TensorFlow's GCS file system when TensorFlow is installed, whose
    endpoint is fixed inside the library; gcsfs honours ``STORAGE_EMULATOR_HOST``, so the code that
    runs on a TPU VM is the code the tests run against an emulator.
"""

import functools
import io
import os
import posixpath
import re
from typing import Callable

from etils import epath
from etils.epath import gpath

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# How long the first contact with a bucket may take before it counts as unreachable. gcsfs retries
# a refused connection six times with exponential backoff (about a minute), TensorStore for longer.
REACH_TIMEOUT_S = 20.0


def _configure_clients() -> None:
  """Points epath's ``gs://`` at gcsfs (see the module docstring). A user's own setting wins."""
  if "EPATH_USE_TF" not in os.environ:
    os.environ["EPATH_USE_TF"] = "false"
    # epath decides once per process whether TensorFlow serves ``gs://`` (a ``functools.cache``
    # filled by the first path it handles, local or not): a path that the user's code, Orbax or
    # TFDS handled before this line would keep TensorFlow's client, which ignores the emulator.
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs asks Google's storage-control API whether a bucket is zonal; an emulator serves no
    # such API, and every call would log the failed probe. Read when gcsfs is first imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def path(p: "str | os.PathLike[str]") -> epath.Path:
  """``p`` as an ``epath.Path`` (``gs://bucket/x`` stays a URL; ``~`` is not expanded)."""
  _configure_clients()
  return epath.Path(p)


def is_remote(p: "str | os.PathLike[str]") -> bool:
  """Whether ``p`` is a URL (``gs://``, ``s3://``, ...) rather than a local path."""
  return bool(_URL.match(os.fspath(p)))


def join(base: "str | os.PathLike[str]", *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joined for URLs (whatever the local separator)."""
  return posixpath.join(os.fspath(base), *parts) if is_remote(base) else os.path.join(base, *parts)


def listdir(p: "str | os.PathLike[str]") -> list[str]:
  """The names in folder ``p``, as ``os.listdir`` (which stays the local way: no object per
  name)."""
  return [child.name for child in path(p).iterdir()] if is_remote(p) else os.listdir(p)


def version(p: "str | os.PathLike[str]") -> float:
  """Changes when file ``p`` is rewritten: its modification time (ns locally, s in a bucket)."""
  return path(p).stat().mtime if is_remote(p) else os.stat(p).st_mtime_ns


def display(p: "str | os.PathLike[str]") -> str:
  """``p`` as messages show it: URLs as given, local paths made absolute."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def credential_setting() -> str:
  """Which emulator or credentials a ``gs://`` request goes to, for error messages."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    return (
      f"STORAGE_EMULATOR_HOST={emulator}, "
      f"TENSORSTORE_GCS_HTTP_URL={os.environ.get('TENSORSTORE_GCS_HTTP_URL', '(unset)')}"
    )
  key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
  if key:
    return f"credentials GOOGLE_APPLICATION_CREDENTIALS={key}"
  return (
    "application default credentials (the VM's service account, or `gcloud auth "
    "application-default login`)"
  )


@functools.lru_cache(maxsize=None)
def _bucket_reached(bucket: str, timeout_s: float, endpoint: str) -> None:
  """Lists one object of ``bucket`` within ``timeout_s``; raises ``OSError`` saying why not.

  Cached: each bucket is probed once per process and ``endpoint`` (``STORAGE_EMULATOR_HOST``);
  failures are not cached, so a retry probes again.
  """
  del endpoint  # part of the cache key only: gcsfs reads the variable itself
  import fsspec  # pylint: disable=g-import-not-at-top
  from fsspec import asyn  # pylint: disable=g-import-not-at-top

  fs = fsspec.filesystem("gcs")
  try:
    # gcsfs's request method (its public calls retry for about a minute on a refused connection);
    # fsspec's own timeout bounds the whole exchange, retries included.
    asyn.sync(
      fs.loop,
      fs._call,
      "GET",
      "b/{}/o",
      bucket,
      json_out=True,
      maxResults=1,  # pylint: disable=protected-access
      timeout=timeout_s,
    )
  except FileNotFoundError:
    raise OSError(f"bucket {bucket!r} does not exist") from None
  except asyn.FSTimeoutError:
    raise OSError(f"no answer from the storage service within {timeout_s:g} s") from None
  except PermissionError as e:
    raise OSError(f"access to bucket {bucket!r} denied ({e})") from None
  except Exception as e:  # pylint: disable=broad-except  # auth, HTTP or connection errors of any client
    raise OSError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def check_reachable(
  p: "str | os.PathLike[str]", what: str, timeout_s: float = REACH_TIMEOUT_S
) -> None:
  """For a ``gs://`` path, checks within ``timeout_s`` that its bucket exists and answers.

  Done before anything else touches the path: the clients behind Orbax and tf.data retry an
  unreachable service for minutes. Local paths and other schemes pass unchecked.

  Args:
    p: the path.
    what: the setting it came from (``--workdir``, ``config.dataset.root``), for the message.
    timeout_s: how long the probe may take, its retries included.

  Raises:
    OSError: one line naming ``what``, the path, why, and the emulator or credentials used.
  """
  match = _URL.match(os.fspath(p))
  if not match or match.group(1) != "gs":
    return
  _configure_clients()
  bucket = os.fspath(p)[len("gs://") :].split("/", 1)[0]
  try:
    _bucket_reached(bucket, timeout_s, os.environ.get("STORAGE_EMULATOR_HOST", ""))
  except OSError as e:
    raise OSError(f"{what}={os.fspath(p)!r}: {e} (using {credential_setting()})") from None


def read_bytes(p: "str | os.PathLike[str] | bytes") -> bytes:
  """The content of file ``p`` (``bytes`` paths as ``tf.numpy_function`` passes them)."""
  if isinstance(p, bytes):
    p = p.decode()
  return path(p).read_bytes()


def write_bytes(p: "str | os.PathLike[str]", data: bytes) -> None:
  """Writes ``data`` to ``p``, creating its parent folder (a no-op in a bucket)."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(data)


def append_text(p: "str | os.PathLike[str]", text: str) -> None:
  """Appends ``text`` to file ``p`` (created if absent).

  Objects in a bucket cannot be appended to: the object is read and written again whole, which is
  fine for the small files appended to (metrics.jsonl).
  """
  target = path(p)
  if not is_remote(p):
    with target.open("a", encoding="utf-8") as f:
      f.write(text)
    return
  old = target.read_text(encoding="utf-8") if target.exists() else ""
  target.write_text(old + text, encoding="utf-8")


def save_figure(p: "str | os.PathLike[str]", save: Callable[[io.BytesIO], None]) -> None:
  """Writes what ``save(buffer)`` writes (e.g. ``figure.savefig``) to ``p``, local or remote."""
  buffer = io.BytesIO()
  save(buffer)
  write_bytes(p, buffer.getvalue())
