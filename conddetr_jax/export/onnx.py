"""The ``onnx`` format: the model, preprocessed images in, logits and boxes out (jax2onnx).

``DIR/onnx/model_<H>x<W>.onnx`` per bucket, batch dynamic: inputs ``image`` (B, H, W, 3) float32
(normalised, zero-padded) and ``pad_mask`` (B, H, W) bool (True on padding); outputs ``logits``
(B, Q, C) and ``boxes`` (B, Q, 4) cxcywh in [0, 1] of the unpadded image. Each file holds the
weights (ONNX has no shared weights across files). Decoding, resizing, normalisation and the
post-processing stay with the caller (ONNX has no image decoder).
"""

import logging
import os
from typing import Any, Callable

import jax
from jax import export
import jax.numpy as jnp
import ml_collections
import numpy as np

from conddetr_jax.export import forward

NOT_CARRIED = (
  "onnx carries the model only (logits and boxes of preprocessed images padded to a bucket): "
  "ONNX has no image decoder, so decoding, resizing, normalisation and post-processing "
  "stay with the caller"
)


def model_file(size: tuple[int, int]) -> str:
  """The file name of one bucket's model."""
  return f"model_{size[0]}x{size[1]}.onnx"


def write(config: ml_collections.ConfigDict, variables: Any, out_dir: str) -> list[str]:
  """Writes one ONNX model per bucket into ``out_dir`` (created); returns their paths.

  Raises:
    ImportError: jax2onnx is not installed (requirements-export.txt).
  """
  # Expected warnings, hundreds of lines: jax2onnx skips its plugins for libraries not installed
  # (equinox, ...), onnx_ir notes every untyped shape constant it writes.
  for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde"):
    logging.getLogger(name).setLevel(logging.ERROR)
  import jax2onnx  # pylint: disable=g-import-not-at-top  (optional: only this format needs it)

  os.makedirs(out_dir, exist_ok=True)
  weights, treedef = forward.flat_weights(variables)
  run = forward.forward_fn(config, treedef)
  (batch,) = export.symbolic_shape("B")
  paths = []
  for size in forward.buckets(config):
    paths.append(os.path.join(out_dir, model_file(size)))
    jax2onnx.to_onnx(
      lambda image, pad_mask: run(weights, image, pad_mask),
      [
        jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch, *size), jnp.bool_),
      ],
      model_name="conddetr",
      input_names=["image", "pad_mask"],
      output_names=["logits", "boxes"],
      return_mode="file",
      output_path=paths[-1],
    )
  return paths


def load(
  out_dir: str, size: tuple[int, int]
) -> Callable[[np.ndarray, np.ndarray], list[np.ndarray]]:
  """One bucket's written model in onnxruntime (CPU) as ``f(image, pad_mask) -> [logits, boxes]``.

  Raises:
    ImportError: onnxruntime is not installed.
  """
  import onnxruntime  # pylint: disable=g-import-not-at-top  (optional: only this format needs it)

  session = onnxruntime.InferenceSession(
    os.path.join(out_dir, model_file(size)), providers=["CPUExecutionProvider"]
  )
  return lambda image, pad_mask: session.run(
    ["logits", "boxes"], {"image": image, "pad_mask": pad_mask}
  )
