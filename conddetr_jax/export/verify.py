"""Checks a written artifact against the JAX model on a few images: the largest difference.

The programs (stablehlo, onnx) are compared on the model's outputs (logits and boxes) for the same
padded batch; the SavedModel on its detections for the images' encoded bytes, against predict.py's
(``evaluation.detect_image``), which does its own decoding, resizing and post-processing.
"""

import io
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from conddetr_jax import models
from conddetr_jax.data import image_files, synthetic
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.export import forward

# A detections function: encoded images -> boxes (B, K, 4), scores (B, K), labels (B, K), count
# (B,).
Serve = Callable[[list[bytes]], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def sample_images(paths: Sequence[str] = (), count: int = 3) -> list[np.ndarray]:
  """(h, w, 3) uint8 images to check with: the files at ``paths``, else ``count`` synthetic ones."""
  if paths:
    return [image_files.read_image(p) for p in paths]
  return [synthetic.draw_image(seed=0, split_code=1, index=i)[0] for i in range(count)]


def fitting(
  pixels: Sequence[np.ndarray], config: ml_collections.ConfigDict, size: tuple[int, int]
) -> list[np.ndarray]:
  """The images, each turned a quarter (transposed) when its resized size does not fit ``size``
  (H, W), so that a landscape bucket and a portrait one are both checked on every image."""
  out = []
  for p in pixels:
    mask = image_files.prepare_image(p, config).pad_mask[0]
    h, w = int((~mask).sum(0).max()), int((~mask).sum(1).max())
    out.append(p if h <= size[0] and w <= size[1] else np.ascontiguousarray(p.transpose(1, 0, 2)))
  return out


def forward_difference(
  config: ml_collections.ConfigDict,
  variables: Any,
  run: Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]],
  size: tuple[int, int],
  pixels: Sequence[np.ndarray],
) -> float:
  """The largest absolute difference of ``run(image, pad_mask) -> (logits, boxes)`` from the JAX
  model's, on ``pixels`` prepared and padded to the bucket ``size`` (one batch)."""
  image, pad_mask, _ = forward.padded_batch(fitting(pixels, config, size), config, size)
  weights, treedef = forward.flat_weights(variables)
  expected = jax.jit(forward.forward_fn(config, treedef))(weights, image, pad_mask)
  got = run(image, pad_mask)
  return max(
    float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64))))
    for g, e in zip(got, expected)
  )


def encode_png(pixels: np.ndarray) -> bytes:
  """Lossless PNG bytes of (h, w, 3) uint8 pixels."""
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def detection_difference(
  config: ml_collections.ConfigDict,
  variables: Any,
  serve: Serve,
  encoded: Sequence[bytes],
  threshold: float,
) -> dict[str, float]:
  """How far ``serve``'s detections of the encoded images are from predict.py's.

  Returns:
    ``{"box_px": largest box coordinate difference, "score": largest score difference}`` over the
    detections scoring at least ``threshold``.

  Raises:
    ValueError: an image's number of detections or their labels differ.
  """
  boxes, scores, labels, count = serve(list(encoded))
  model = models.build_model(config)
  box_px, score = 0.0, 0.0
  for i, data in enumerate(encoded):
    loaded = image_files.prepare_image(
      np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), config
    )
    ref = coco_eval.detect_image(variables, loaded, model=model, k=coco_eval.top_k(config))
    n = int((ref["scores"] >= threshold).sum())
    if int(count[i]) != n or not np.array_equal(labels[i, :n], ref["labels"][:n]):
      raise ValueError(
        f"image {i}: {int(count[i])} detections labelled {labels[i, : int(count[i])].tolist()}, "
        f"the model gives {n} labelled {ref['labels'][:n].tolist()}"
      )
    if n:
      box_px = max(box_px, float(np.abs(boxes[i, :n] - ref["boxes"][:n]).max()))
      score = max(score, float(np.abs(scores[i, :n] - ref["scores"][:n]).max()))
  return {"box_px": box_px, "score": score}


def check(what: str, difference: float, tolerance: float) -> str:
  """``"<what>: largest difference <d> (tolerance <t>)"``.

  Raises:
    ValueError: ``difference`` is above ``tolerance`` (or not a number).
  """
  line = f"{what}: largest difference {difference:.3g} (tolerance {tolerance:g})"
  if not difference <= tolerance:
    raise ValueError(f"export check failed, {line}")
  return line
