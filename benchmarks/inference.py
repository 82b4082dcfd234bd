r"""Inference speed side by side: the JAX model (jit), each export and the original's forward.

  python benchmarks/inference.py --config=configs/r50.py [--batches=1,2] [--iters=3]

All run the same padded batch of the config's landscape bucket (832x1344 for R50: an 800x1333
image, the original's evaluation size, padded per the bucket rules) with the same weights: HF
transformers' Conditional DETR (tests/hf_reference.py, seeded random weights; the independent
reference of the parity tests) converted to Flax by ``convert.from_torch``. The exports are
StableHLO (``jax.export.deserialize``), the SavedModel's ``model_<H>x<W>`` signature
(``tf.saved_model.load``; its JPEG-in signature adds decoding and resizing) and ONNX (onnxruntime,
CPU). Prints per runtime and batch the median seconds per batch after one warm-up call, the images
per second and the largest difference of its logits and boxes from the JAX model's (the original
does not mask padding, so it differs from the JAX model on a padded batch); the last line
is ``inference jax_img_s=... stablehlo_img_s=... saved_model_img_s=... onnx_img_s=...
original_img_s=...`` at the largest batch.
"""

import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

from absl import app, flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from conddetr_jax.checkpoints import convert
from conddetr_jax.export import forward, saved_model, stablehlo
from conddetr_jax.export import onnx as onnx_export

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model config.")
_BATCHES = flags.DEFINE_list("batches", ["1", "2"], "Batch sizes to time.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls per runtime and batch (after one warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the images.")

RUNTIMES = ("jax", "stablehlo", "saved_model", "onnx", "original")
Run = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


def reference_model(config, seed: int):
  """HF's Conditional DETR of ``config.model``'s sizes with seeded weights (tests/hf_reference)."""
  # Importing it first declares the torchvision ops the CUDA wheel fails to register (hf_step.py).
  import tests.conftest  # noqa: F401  # pylint: disable=unused-import

  # isort: split
  from tests import hf_reference

  m = config.model
  if m.backbone_num_stages != 4 or m.dense_head or m.backbone_norm != "frozen_bn":
    raise ValueError(
      "the original's forward needs a 4-stage frozen-BN backbone without dense head, got "
      f"backbone_num_stages={m.backbone_num_stages}, backbone_norm={m.backbone_norm}, "
      f"dense_head={m.dense_head}"
    )
  ref = hf_reference.build_reference(
    m.backbone,
    dilation=m.dilation,
    num_classes=m.num_classes,
    num_queries=m.num_queries,
    seed=seed,
    **hf_reference.transformer_sizes(m),
  )
  return ref, hf_reference.original_state_dict(ref)


def original_run(ref) -> Run:
  """The HF model's forward (PyTorch, CPU, all cores) as ``f(image, pad_mask) -> logits, boxes``."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))

  def run(image, pad_mask):
    with torch.no_grad():
      out = ref.model(
        pixel_values=torch.from_numpy(image).permute(0, 3, 1, 2),
        pixel_mask=torch.from_numpy(~pad_mask).long(),
      )
    return out.logits.numpy(), out.pred_boxes.numpy()

  return run


def saved_model_run(folder: str, size: tuple[int, int]) -> Run:
  """The SavedModel's bare-model signature of bucket ``size``, loaded as a user loads it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  signature = tf.saved_model.load(folder).signatures[f"model_{size[0]}x{size[1]}"]

  def run(image, pad_mask):
    out = signature(image=tf.constant(image), pad_mask=tf.constant(pad_mask))
    return out["logits"].numpy(), out["boxes"].numpy()

  return run


def timed(run: Run, image: np.ndarray, pad_mask: np.ndarray, iters: int):
  """(median seconds per call after one warm-up call, the warm-up call's outputs)."""
  out = [np.asarray(x) for x in run(image, pad_mask)]
  seconds = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(run(image, pad_mask))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), out


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  batches = sorted(int(b) for b in _BATCHES.value)
  ref, state = reference_model(config, _SEED.value)
  variables = convert.from_torch(state, config)
  size = forward.buckets(config)[0]
  ds = config.dataset
  rng = np.random.default_rng(_SEED.value)
  photos = [
    rng.integers(0, 256, (ds.eval_size, ds.eval_max_size, 3), np.uint8) for _ in range(batches[-1])
  ]
  image, pad_mask, _ = forward.padded_batch(photos, config, size)
  weights, treedef = forward.flat_weights(variables)
  jitted = jax.jit(forward.forward_fn(config, treedef))
  with tempfile.TemporaryDirectory() as out_dir:
    on_device = jax.device_put(weights)  # the JAX model keeps its weights on the device
    runs = {"jax": lambda i, m: jitted(on_device, i, m)}
    for name, module in (
      ("stablehlo", stablehlo),
      ("saved_model", saved_model),
      ("onnx", onnx_export),
    ):
      start = time.perf_counter()
      module.write(config, variables, os.path.join(out_dir, name))
      print(f"{name}: written in {time.perf_counter() - start:.0f} s", flush=True)
    runs["stablehlo"] = stablehlo.load(os.path.join(out_dir, "stablehlo"), size)
    runs["saved_model"] = saved_model_run(os.path.join(out_dir, "saved_model"), size)
    runs["onnx"] = onnx_export.load(os.path.join(out_dir, "onnx"), size)
    runs["original"] = original_run(ref)
    print(
      f"{config.model.backbone} padded {size[0]}x{size[1]} (images {ds.eval_size}x"
      f"{ds.eval_max_size}), {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}"
    )
    img_s = {}
    for batch in batches:
      expected = None
      for name in RUNTIMES:
        seconds, out = timed(runs[name], image[:batch], pad_mask[:batch], _ITERS.value)
        expected = out if name == "jax" else expected
        diff = max(float(np.abs(o - e).max()) for o, e in zip(out, expected))
        img_s[name] = batch / seconds
        print(
          f"batch {batch} {name:12s} {seconds * 1e3:9.1f} ms/batch {seconds * 1e3 / batch:9.1f} "
          f"ms/image {img_s[name]:8.3f} img/s  max|diff| vs jax {diff:.2g}",
          flush=True,
        )
  print("inference " + " ".join(f"{name}_img_s={img_s[name]:.3f}" for name in RUNTIMES))


if __name__ == "__main__":
  app.run(main)
