"""Metric outputs of a run: ``<workdir>/metrics.jsonl``, TensorBoard event files, console lines.

Only process 0 writes; the other processes get a writer that does nothing, so the loop calls it
unconditionally. A workdir in a bucket gets the same files: objects cannot be appended to, so both
are rewritten whole (a full COCO run's are a few MB at the end), at most every ``UPLOAD_EVERY_S``
and on ``flush`` and ``close``. The loop flushes at every checkpoint and evaluation, so a run killed
in a bucket loses only the records of steps after its last checkpoint, which the resumed run
logs again.
"""

import io
import json
import os
import shutil
import tempfile
import time
from typing import Mapping

from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from conddetr_jax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# How often a workdir in a bucket gets its metrics rewritten. Each upload rewrites both files whole
# (a round trip of a few MB late in a run, in the step loop), and Cloud Storage accepts about one
# write per second to one object name.
UPLOAD_EVERY_S = 30.0


class MetricWriter:
  """Appends one JSON object per call to ``metrics.jsonl`` and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, upload_every_s: float = UPLOAD_EVERY_S):
    """Opens the outputs under ``workdir`` (local or a URL) when ``enabled`` (process 0); else every
    call is a no-op. ``upload_every_s``: a URL's files are rewritten at most this often by ``write``
    (``flush`` and ``close`` always rewrite them)."""
    self._enabled = enabled
    self._upload_every_s = upload_every_s
    if not enabled:
      return
    self._workdir = storage.path(workdir)
    self._remote = storage.is_remote(workdir)
    self._workdir.mkdir(parents=True, exist_ok=True)
    if self._remote:
      # TensorBoard's writer goes through TensorFlow's file system, which cannot be pointed at an
      # emulator: it writes a local file that ``_upload`` copies to the bucket.
      self._staging = tempfile.mkdtemp(prefix="conddetr-tensorboard-")
      self._events = EventFileWriter(self._staging)
      jsonl = self._workdir / METRICS_FILE
      self._lines = jsonl.read_text(encoding="utf-8") if jsonl.exists() else ""
      self._uploaded_at = time.monotonic()
    else:
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
      self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records ``{"step": step, **scalars}``; values must be Python numbers."""
    if not self._enabled:
      return
    line = json.dumps({"step": step, **scalars}) + "\n"
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()
      ]
    )
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    if self._remote:
      self._lines += line
      if time.monotonic() - self._uploaded_at >= self._upload_every_s:
        self._upload()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def write_image(self, step: int, tag: str, image: Image.Image) -> None:
    """Records ``image`` (RGB) for TensorBoard's Images tab; metrics.jsonl gets nothing."""
    if not self._enabled:
      return
    png = io.BytesIO()
    image.save(png, format="PNG")
    encoded = summary_pb2.Summary.Image(
      height=image.height, width=image.width, colorspace=3, encoded_image_string=png.getvalue()
    )
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=encoded)])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def _upload(self) -> None:
    """Remote workdir: writes metrics.jsonl and the TensorBoard event file whole to the bucket."""
    storage.write_bytes(self._workdir / METRICS_FILE, self._lines.encode())
    self._events.flush()
    local = self._events.get_logdir()
    for name in os.listdir(local):
      with open(os.path.join(local, name), "rb") as f:
        storage.write_bytes(self._workdir / TENSORBOARD_DIR / name, f.read())
    self._uploaded_at = time.monotonic()

  def flush(self) -> None:
    """Makes every record so far durable: on disk, or rewritten in the bucket."""
    if not self._enabled:
      return
    if self._remote:
      self._upload()
    else:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the outputs."""
    if not self._enabled:
      return
    if self._remote:
      self._upload()
      self._events.close()
      shutil.rmtree(self._staging, ignore_errors=True)
    else:
      self._jsonl.close()
      self._events.close()


def recorded_evaluation(workdir: str, step: int) -> dict[str, float] | None:
  """The COCO metrics ``metrics.jsonl`` holds for ``step`` (the last such record), or None.

  A rerun of a finished run finds its final evaluation here instead of appending a second record
  for the same step.
  """
  path = storage.path(workdir) / METRICS_FILE
  if not path.exists():
    return None
  found = None
  with path.open(encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash mid-write
        continue
      if record.get("step") == step and "AP" in record:
        found = {k: v for k, v in record.items() if k not in ("step", "epoch")}
  return found


def format_eta(seconds: float) -> str:
  """``h:mm:ss`` for a duration in seconds."""
  seconds = max(int(seconds), 0)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_progress(step: int, total_steps: int, scalars: Mapping[str, float], eta_s: float) -> None:
  """The console's progress line: step/total, loss, learning rate, images/s, the share of time
  spent waiting for input, TFLOP/s per device and MFU where known (``telemetry``), and ETA."""
  speed = f"{scalars['images_per_s']:.1f} img/s"
  if "input_wait_share" in scalars:
    speed += f"  input wait {scalars['input_wait_share']:.0%}"
  if "tflops_per_device" in scalars:
    speed += f"  {scalars['tflops_per_device']:.3g} TFLOP/s/device"
  if "mfu" in scalars:
    speed += f"  MFU {scalars['mfu']:.1%}"
  logging.info(
    "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %s  ETA %s",
    step,
    total_steps,
    scalars["loss"],
    scalars["lr"],
    scalars["grad_norm"],
    speed,
    format_eta(eta_s),
  )
