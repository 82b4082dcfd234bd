"""The dense auxiliary head's losses: one-to-many assignment of encoder tokens to targets.

Co-DETR (Zong et al., "DETRs with Collaborative Hybrid Assignments Training", ICCV 2023) trains
DETR's encoder with auxiliary dense heads under one-to-many assignment: each object supervises
every feature location it covers, not the one query the Hungarian matcher gives it, which is
what makes the encoder's features localise early. This is the simplest such head (FCOS-like
assignment, the decoder's own loss terms):

* a valid token is a positive of every target box that contains its centre, and of the target
  whose centre it is nearest to (so every box has one, however small); a token claimed by
  several targets takes the smallest (FCOS's rule);
* ``loss_ce_dense``: the sigmoid focal loss over every valid token and class (positives'
  one-hot = their target's class), summed, divided by the box count as the decoder's, with each
  positive weighted by 1 / its target's number of positives;
* ``loss_bbox_dense``, ``loss_giou_dense``: L1 and 1 - GIoU of each positive's box against its
  target, averaged over each target's positives, summed over targets, divided by the box count.

So every object's positives weigh one box together, as a matched query does in the decoder's
terms, whatever the object's size.

The normaliser is the set criterion's ``norm`` (the global box count), so gradient accumulation
and pmap combine these terms exactly as the decoder's.
"""

import jax
import jax.numpy as jnp
import ml_collections

from conddetr_jax.criterion import boxes as box_ops
from conddetr_jax.criterion.focal import sigmoid_focal_loss

TERMS = ("loss_ce_dense", "loss_bbox_dense", "loss_giou_dense")


def assign_tokens(
  centres: jax.Array, token_valid: jax.Array, tgt_boxes: jax.Array, box_valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Each token's target slot under the one-to-many rule of the module docstring.

  Args:
    centres: (B, T, 2) token centres (x, y) in [0, 1].
    token_valid: (B, T) bool, False on padding.
    tgt_boxes: (B, M, 4) cxcywh normalised.
    box_valid: (B, M) bool.

  Returns:
    (B, T) int32 target slot per token (-1: a negative), and (B, M) float32 each target's
    number of positives.
  """
  x0, y0, x1, y1 = jnp.moveaxis(box_ops.cxcywh_to_xyxy(tgt_boxes), -1, 0)  # (B, M) each
  cx, cy = centres[..., 0, None], centres[..., 1, None]  # (B, T, 1)
  inside = (cx > x0[:, None]) & (cx < x1[:, None]) & (cy > y0[:, None]) & (cy < y1[:, None])
  dist = jnp.sum((centres[:, :, None, :] - tgt_boxes[:, None, :, :2]) ** 2, axis=-1)  # (B, T, M)
  dist = jnp.where(token_valid[..., None], dist, jnp.inf)
  nearest = jax.nn.one_hot(jnp.argmin(dist, axis=1), centres.shape[1], axis=1, dtype=bool)
  candidate = (inside | nearest) & token_valid[..., None] & box_valid[:, None, :]
  area = jnp.where(candidate, box_ops.area(box_ops.cxcywh_to_xyxy(tgt_boxes))[:, None, :], jnp.inf)
  slot = jnp.where(candidate.any(-1), jnp.argmin(area, axis=-1), -1)
  counts = jax.nn.one_hot(slot, tgt_boxes.shape[1]).sum(1)  # -1 rows are zero
  return slot, counts


def dense_losses(
  dense: dict[str, jax.Array],
  tgt_boxes: jax.Array,
  tgt_labels: jax.Array,
  box_valid: jax.Array,
  norm: jax.Array,
  loss_config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
  """The three unweighted dense terms (``TERMS``) of the model's ``dense_outputs``.

  Args:
    dense: "pred_logits" (B, T, C), "pred_boxes" (B, T, 4) cxcywh, "token_centres" (B, T, 2),
      "token_valid" (B, T) bool.
    tgt_boxes, tgt_labels, box_valid: the batch's (B, M, 4), (B, M), (B, M) targets.
    norm: the set criterion's box-count normaliser.
    loss_config: ``config.loss`` (focal alpha and gamma).

  Returns:
    Dict of () float32 terms.
  """
  logits = dense["pred_logits"].astype(jnp.float32)
  pred = dense["pred_boxes"].astype(jnp.float32)
  token_valid = dense["token_valid"]
  slot, counts = assign_tokens(dense["token_centres"], token_valid, tgt_boxes, box_valid)
  positive = slot >= 0
  index = jnp.maximum(slot, 0)
  labels = jnp.take_along_axis(tgt_labels, index, axis=1)
  onehot = jax.nn.one_hot(jnp.where(positive, labels, -1), logits.shape[-1])
  # A positive weighs 1 / its target's positives, so each object's terms weigh one box.
  weight = jnp.where(
    positive, 1.0 / jnp.maximum(jnp.take_along_axis(counts, index, axis=1), 1.0), 0.0
  )
  focal = sigmoid_focal_loss(logits, onehot, loss_config.focal_alpha, loss_config.focal_gamma)
  token_weight = jnp.where(positive, weight, token_valid.astype(jnp.float32))
  loss_ce = (token_weight[..., None] * focal).sum() / norm

  target = jnp.take_along_axis(tgt_boxes, index[..., None], axis=1)
  target = jnp.where(positive[..., None], target, 0.5)  # defined GIoU for negatives
  l1 = jnp.abs(pred - target).sum(-1)
  giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))
  return {
    "loss_ce_dense": loss_ce,
    "loss_bbox_dense": (weight * l1).sum() / norm,
    "loss_giou_dense": (weight * (1 - giou)).sum() / norm,
  }
