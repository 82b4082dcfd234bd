"""Detections drawn on an image: boxes, class names and scores, saved as PNG (PIL only).

The one drawing style of the demo's prediction images (``evaluation.write_prediction_images``) and
predict.py (``prediction.predict_files``): the image file's own pixels, small images enlarged
(``enlargement``), boxes clipped to the picture and captions kept inside it. Only the drawing is
clipped; the detections' json keeps the model's boxes, as the original's PostProcess does.
"""

from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from conddetr_jax import storage

# Distinct, saturated colours; a label always gets the same one.
_PALETTE = (
  (230, 25, 75),
  (60, 180, 75),
  (255, 225, 25),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 212),
  (0, 128, 128),
  (220, 190, 255),
  (170, 110, 40),
  (128, 0, 0),
  (170, 255, 195),
)


MIN_DRAWN_SIDE = 512  # small images are enlarged about this far when drawn, for legible captions


def enlargement(height: int, width: int) -> int:
  """The integer factor ``draw_detections(scale=...)`` enlarges an image of this size by."""
  return max(1, MIN_DRAWN_SIDE // max(height, width))


def class_name(label: int, class_names: Mapping[int, str]) -> str:
  """The label's name, or 'class 12' for a label with none."""
  return class_names.get(int(label), f"class {int(label)}")


def label_text(label: int, score: float, class_names: Mapping[int, str]) -> str:
  """The caption of a box: 'name 0.87'."""
  return f"{class_name(label, class_names)} {float(score):.2f}"


def draw_detections(
  image: np.ndarray,
  boxes: np.ndarray,
  scores: np.ndarray,
  labels: np.ndarray,
  class_names: Mapping[int, str],
  threshold: float = 0.5,
  scale: int = 1,
) -> Image.Image:
  """The image with every detection scoring at least ``threshold`` drawn on it.

  Args:
    image: (H, W, 3) uint8 RGB.
    boxes: (K, 4) absolute xyxy in the pixels of ``image``.
    scores: (K,) in [0, 1].
    labels: (K,) category ids.
    class_names: category id -> name.
    threshold: the lowest score drawn.
    scale: the image is enlarged this many times (nearest) before drawing, boxes with it, so that
      captions stay legible on small images.

  Returns:
    A new RGB PIL image of (scale * H, scale * W); boxes of higher scores are drawn last, on top.
    Boxes are clipped to the image, and captions shifted to stay inside it.
  """
  canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  if scale != 1:
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  # Thin lines on small images, thicker ones on photos.
  width = max(1, round(max(canvas.size) / 300))
  keep = np.flatnonzero(np.asarray(scores) >= threshold)
  for k in keep[np.argsort(np.asarray(scores)[keep], kind="stable")]:
    x0, y0, x1, y1 = clip_box(np.asarray(boxes[k], np.float64) * scale, canvas.height, canvas.width)
    color = _PALETTE[int(labels[k]) % len(_PALETTE)]
    draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
    text = label_text(labels[k], scores[k], class_names)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tx, ty = caption_origin(x0, y0, right - left + 2, bottom - top + 2, canvas.height, canvas.width)
    draw.rectangle((tx, ty, tx + right - left + 2, ty + bottom - top + 2), fill=color)
    draw.text((tx + 1 - left, ty + 1 - top), text, fill=(0, 0, 0), font=font)
  return canvas


def clip_box(box: np.ndarray, height: int, width: int) -> tuple[float, float, float, float]:
  """An xyxy box clipped to an image of (height, width) pixels (its last pixel row and column)."""
  x0, x1 = np.clip([box[0], box[2]], 0, width - 1)
  y0, y1 = np.clip([box[1], box[3]], 0, height - 1)
  return float(x0), float(y0), float(x1), float(y1)


def caption_origin(
  x0: float, y0: float, text_width: int, text_height: int, height: int, width: int
) -> tuple[float, float]:
  """Top-left corner of a box's caption: above the box, or inside it at the top edge, shifted left
  or up as needed to lie within an image of (height, width) (if the image is large enough)."""
  ty = y0 - text_height if y0 - text_height >= 0 else y0
  return max(0.0, min(x0, width - 1 - text_width)), max(0.0, min(ty, height - 1 - text_height))


def save_detections_png(
  path: str,
  image: np.ndarray,
  detections: Mapping[str, np.ndarray],
  class_names: Mapping[int, str],
  threshold: float,
) -> None:
  """Writes ``draw_detections`` of an image's ``detections`` ("boxes", "scores" and "labels",
  as there) to ``path`` (local or a URL) as PNG, creating its folder; the image is enlarged by
  ``enlargement`` of its size."""
  boxes, scores, labels = (detections[key] for key in ("boxes", "scores", "labels"))
  scale = enlargement(*image.shape[:2])
  drawing = draw_detections(image, boxes, scores, labels, class_names, threshold, scale)
  storage.save_figure(path, lambda buffer: drawing.save(buffer, format="PNG"))
