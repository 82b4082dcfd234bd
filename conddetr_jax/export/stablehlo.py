"""The ``stablehlo`` format: ``jax.export`` programs for CPU, CUDA and TPU, batch symbolic.

``DIR/stablehlo/`` holds ``weights.npz`` (the flat weights, keys ``0000``, ``0001``, ... in order)
and one ``forward_<H>x<W>.jax_export`` per bucket. Loading needs JAX and numpy only::

  exp = jax.export.deserialize(open("forward_832x1344.jax_export", "rb").read())
  w = np.load("weights.npz"); weights = [w[k] for k in sorted(w.files)]
  logits, boxes = exp.call(weights, image, pad_mask)  # (B, H, W, 3) float32, (B, H, W) bool
"""

import os
from typing import Any, Callable

import jax
from jax import export
import jax.numpy as jnp
import ml_collections
import numpy as np

from conddetr_jax.export import forward

PLATFORMS = ("cpu", "cuda", "tpu")
NOT_CARRIED = (
  "stablehlo carries the model only (logits and boxes of preprocessed images padded to a bucket): "
  "decoding, resizing, normalisation and post-processing stay with the caller"
)
WEIGHTS_FILE = "weights.npz"


def program_file(size: tuple[int, int]) -> str:
  """The file name of one bucket's program."""
  return f"forward_{size[0]}x{size[1]}.jax_export"


def export_forward(
  config: ml_collections.ConfigDict, weights: list[np.ndarray], treedef: Any, size: tuple[int, int]
) -> export.Exported:
  """``forward.forward_fn`` exported for ``PLATFORMS`` at the padded ``size`` (H, W), batch
  symbolic."""
  (batch,) = export.symbolic_shape("b")
  specs = (
    [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
    jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32),
    jax.ShapeDtypeStruct((batch, *size), jnp.bool_),
  )
  return export.export(jax.jit(forward.forward_fn(config, treedef)), platforms=PLATFORMS)(*specs)


def write(config: ml_collections.ConfigDict, variables: Any, out_dir: str) -> list[str]:
  """Writes the weights and one program per bucket into ``out_dir`` (created); returns their
  paths."""
  os.makedirs(out_dir, exist_ok=True)
  weights, treedef = forward.flat_weights(variables)
  paths = [os.path.join(out_dir, WEIGHTS_FILE)]
  np.savez(paths[0], **{f"{i:04d}": w for i, w in enumerate(weights)})
  for size in forward.buckets(config):
    paths.append(os.path.join(out_dir, program_file(size)))
    with open(paths[-1], "wb") as f:
      f.write(export_forward(config, weights, treedef, size).serialize())
  return paths


def load(
  out_dir: str, size: tuple[int, int]
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
  """One bucket's written program as ``f(image, pad_mask) -> (logits, boxes)`` (numpy), as a user
  loads it: ``jax.export.deserialize`` and the weights file, nothing of the model's code."""
  with open(os.path.join(out_dir, program_file(size)), "rb") as f:
    program = export.deserialize(f.read())
  with np.load(os.path.join(out_dir, WEIGHTS_FILE)) as w:
    weights = [w[k] for k in sorted(w.files)]
  return lambda image, pad_mask: tuple(
    np.asarray(x) for x in program.call(weights, image, pad_mask)
  )
