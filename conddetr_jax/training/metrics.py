"""Metric outputs of a run: ``<workdir>/metrics.jsonl``, TensorBoard event files, console lines.

Only process 0 writes; the other processes get a writer that does nothing, so the loop calls it
unconditionally.
"""

import json
import os
import time
from typing import Mapping

from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Appends one JSON object per call to ``metrics.jsonl`` and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    """Opens the outputs under ``workdir`` when ``enabled`` (process 0); else every call is a no-op."""
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records ``{"step": step, **scalars}``; values must be Python numbers."""
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                                         for name, value in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    """Pushes buffered TensorBoard events to disk."""
    if self._enabled:
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes the outputs."""
    if self._enabled:
      self._jsonl.close()
      self._events.close()


def recorded_evaluation(workdir: str, step: int) -> dict[str, float] | None:
  """The COCO metrics ``metrics.jsonl`` holds for ``step`` (the last such record), or None.

  A rerun of a finished run finds its final evaluation here instead of appending a second record
  for the same step.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  found = None
  with open(path, encoding="utf-8") as f:
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
  """The console's progress line: step/total, loss, learning rate, images/s and ETA."""
  logging.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.1f img/s  ETA %s", step, total_steps,
               scalars["loss"], scalars["lr"], scalars["grad_norm"], scalars["images_per_s"], format_eta(eta_s))
