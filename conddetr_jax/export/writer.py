"""Writes the chosen formats of a model into one folder and checks each as it is written."""

import importlib
import io
import os
from typing import Any, Sequence

import ml_collections
from PIL import Image

from conddetr_jax.export import forward, verify

FORMATS = ("stablehlo", "saved_model", "onnx")
BOX_PX_TOLERANCE = 0.5  # a SavedModel's boxes vs predict.py's, in image pixels


def _encoded(pixels: Any, index: int) -> bytes:
  """Sample image bytes for the SavedModel: JPEG for even indices, PNG for odd (both paths)."""
  if index % 2:
    return verify.encode_png(pixels)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def export(
  config: ml_collections.ConfigDict,
  variables: Any,
  out_dir: str,
  formats: Sequence[str],
  images: Sequence[Any],
  tolerance: float,
) -> list[str]:
  """Writes ``out_dir/<format>/`` for each format, then checks it on ``images`` (uint8 RGB arrays).

  Args:
    config: the model's run config.
    variables: its ``{'params', 'batch_stats'}``.
    out_dir: output folder (created).
    formats: names of ``FORMATS``.
    images: (h, w, 3) uint8 images to check with.
    tolerance: largest difference allowed in logits and boxes (programs) or scores (SavedModel).

  Returns:
    The report's lines: per format, what it cannot carry, each check's largest difference, and
    where it was written.

  Raises:
    ValueError: an unknown format, or a check above tolerance.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f"--format: unknown {unknown}; expected some of {', '.join(FORMATS)}")
  lines = []
  for name in formats:
    module = importlib.import_module(f"conddetr_jax.export.{name}")
    folder = os.path.join(out_dir, name)
    module.write(config, variables, folder)
    lines.append(f"{name}: {module.NOT_CARRIED}")
    if name == "saved_model":
      threshold = float(config.evaluation.score_threshold)
      diffs = verify.detection_difference(
        config,
        variables,
        module.load(folder, threshold),
        [_encoded(p, i) for i, p in enumerate(images)],
        threshold,
      )
      lines.append(
        verify.check(
          f"{name} detections vs predict.py, box pixels", diffs["box_px"], BOX_PX_TOLERANCE
        )
      )
      lines.append(
        verify.check(f"{name} detections vs predict.py, scores", diffs["score"], tolerance)
      )
    else:
      for size in forward.buckets(config):
        diff = verify.forward_difference(config, variables, module.load(folder, size), size, images)
        lines.append(
          verify.check(f"{name} {size[0]}x{size[1]} logits and boxes vs JAX", diff, tolerance)
        )
    lines.append(f"{name}: written to {folder}")
  return lines
