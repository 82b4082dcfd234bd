"""Decoding of model outputs into scored, labelled, absolute xyxy detections."""

import jax
import jax.numpy as jnp

from conddetr_jax.criterion import boxes as box_ops


def postprocess(
  out: dict, orig_sizes: jax.Array, top_k: int = 100, with_queries: bool = False
) -> dict[str, jax.Array]:
  """The original's PostProcess: the top_k (query, class) pairs of each image.

  Every query scores every class independently (sigmoid, no background), so one
  query may yield several detections with different labels.

  Args:
    out: model output with "pred_logits" (B, Q, C) and "pred_boxes" (B, Q, 4) cxcywh
      in [0, 1] of the unpadded image.
    orig_sizes: (B, 2) the size (h, w) to scale boxes to, e.g. the original image's.
    top_k: detections per image; at most Q * C.
    with_queries: also return each detection's query index (which decoder query made it).

  Returns:
    "scores" (B, top_k) float32 in decreasing order, "labels" (B, top_k) int32,
    "boxes" (B, top_k, 4) float32 absolute xyxy; with ``with_queries``, "queries" (B, top_k) int32
    in [0, Q).
  """
  logits = out["pred_logits"].astype(jnp.float32)
  batch, _, num_classes = logits.shape
  scores, index = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(batch, -1), top_k)
  labels = index % num_classes
  query = index // num_classes
  boxes = box_ops.cxcywh_to_xyxy(out["pred_boxes"].astype(jnp.float32))
  boxes = jnp.take_along_axis(boxes, query[..., None], axis=1)
  h, w = jnp.moveaxis(orig_sizes.astype(jnp.float32), -1, 0)
  scale = jnp.stack([w, h, w, h], axis=-1)
  dets = {"scores": scores, "labels": labels.astype(jnp.int32), "boxes": boxes * scale[:, None, :]}
  if with_queries:
    dets["queries"] = query.astype(jnp.int32)
  return dets
