"""The original's set criterion: Hungarian matching, sigmoid focal, L1 and GIoU losses.

Term names follow the original: ``loss_ce``, ``loss_bbox``, ``loss_giou`` for the final
decoder layer and ``loss_ce_0`` ... for the auxiliary ones (layer i = i-th decoder
layer), plus the logged metrics ``class_error`` and ``cardinality_error(_i)``, which
carry no gradient and are not part of ``"loss"``.

Normalisation (num_boxes). The original divides every term by the number of target
boxes averaged over its GPUs (all_reduce sum / world size, clamped at 1), and DDP
averages the gradients of the per-GPU losses. Averaged over GPUs, its loss is thus
(sum of per-box and per-query terms over the global batch) / (global box count), as
long as the global batch holds at least one box per GPU (below that, its clamp makes
the value depend on the number of GPUs). Both ways of calling ``set_criterion``
compute that device-count-independent quantity, with the count clamped at 1:

* ``jax.jit`` over a global batch (sharded or not): ``axis_name=None``; the count is
  the global count and the returned losses are the global-batch losses.
* inside ``pmap``/``shard_map`` over a data axis: pass its name, e.g.
  ``axis_name="data"``. The count is ``psum``-ed over the axis and divided by the axis
  size, as in the original; each device gets its share of the global loss, and
  ``lax.pmean`` of the per-device losses (and of their gradients) over the axis gives
  the global-batch values of the jit path. ``class_error`` and ``cardinality_error``
  are then per-device, as in the original before its logging average.

Group DETR (``config.model.num_groups`` K > 1; the model's training outputs hold K
groups of Q queries, group k at [k*Q, (k+1)*Q)). Each group is matched one-to-one to
the targets on its own, and each group's terms are normalised by the same box count,
as one set: every group's loss is what a 1-group model computes on that group's
outputs, and the returned terms are their sums over the groups. ``class_error`` and
``cardinality_error`` pool all groups.

The dense auxiliary head (``config.model.dense_head``): when the outputs hold ``dense_outputs``,
the terms of ``dense_losses`` are added, each with its decoder counterpart's weight times
``config.loss.dense_weight``.
"""

import jax
import jax.numpy as jnp
import ml_collections

from conddetr_jax.criterion import boxes as box_ops
from conddetr_jax.criterion import dense_losses, matching
from conddetr_jax.criterion.focal import sigmoid_focal_loss

_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes(box_valid: jax.Array, axis_name: str | None = None) -> jax.Array:
  """The loss normaliser (see the module docstring).

  Args:
    box_valid: (B, M) bool, this device's (or the global) target slots.
    axis_name: the pmap/shard_map data axis, or None under plain jit.

  Returns:
    () float32: max(global count, 1), divided by the axis size if axis_name is given.
  """
  count = box_valid.sum().astype(jnp.float32)
  if axis_name is None:
    return jnp.maximum(count, 1.0)
  total = jax.lax.psum(count, axis_name)
  return jnp.maximum(total, 1.0) / jax.lax.psum(1, axis_name)


def _stack_layers(out: dict) -> tuple[jax.Array, jax.Array]:
  """(L, B, Q, C) logits and (L, B, Q, 4) boxes: auxiliary layers first, final last."""
  layers = list(out.get("aux_outputs", ())) + [out]
  logits = jnp.stack([o["pred_logits"] for o in layers]).astype(jnp.float32)
  boxes = jnp.stack([o["pred_boxes"] for o in layers]).astype(jnp.float32)
  return logits, boxes


def _groups_as_images(
  logits: jax.Array, boxes: jax.Array, num_groups: int, num_queries: int
) -> tuple[jax.Array, jax.Array]:
  """(L, B, K*Q, ...) -> (L, B*K, Q, ...): each group of queries becomes an image of its own
  (image b's group k at b*K + k), so matching and losses treat it as one set."""
  layers, batch, queries = logits.shape[:3]
  if queries != num_groups * num_queries:
    raise ValueError(
      f"{queries} predicted queries, expected config.model.num_groups={num_groups} x "
      f"num_queries={num_queries} (the criterion takes the model's train=True outputs)"
    )
  split = lambda x: x.reshape((layers, batch * num_groups, num_queries) + x.shape[3:])
  return split(logits), split(boxes)


def set_criterion(
  out: dict, batch: dict, config: ml_collections.ConfigDict, axis_name: str | None = None
) -> dict[str, jax.Array]:
  """Matches every decoder layer to the targets and computes the original's losses.

  Args:
    out: model output: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) cxcywh, and,
      with aux_loss, "aux_outputs": a list of such dicts, one per earlier layer. With
      ``config.model.num_groups`` K > 1, Q = K * num_queries (the train=True output).
    batch: "boxes" (B, M, 4) cxcywh normalised, "labels" (B, M) int, "box_valid"
      (B, M) bool (padding slots False; their boxes and labels are ignored).
    config: the full config; reads ``config.matcher``, ``config.loss`` and
      ``config.model.num_groups`` (1 if absent).
    axis_name: the data axis when called inside pmap/shard_map, else None.

  Returns:
    Dict of () float32: "loss" (the weighted total), the unweighted terms
    loss_ce/loss_bbox/loss_giou, their ``_i`` auxiliary versions and (with the dense head) their
    ``_dense`` versions, "class_error" (final layer) and "cardinality_error"/"cardinality_error_i".
  """
  logits, pred_boxes = _stack_layers(out)
  num_layers, _, _, num_classes = logits.shape
  tgt_boxes = batch["boxes"].astype(jnp.float32)
  tgt_labels = batch["labels"].astype(jnp.int32)
  valid = batch["box_valid"].astype(bool)
  # One set of targets: every group is normalised as a whole set (see the module docstring).
  norm = num_boxes(valid, axis_name)
  num_groups = config.model.num_groups
  if num_groups > 1:
    logits, pred_boxes = _groups_as_images(logits, pred_boxes, num_groups, config.model.num_queries)
    tgt_boxes, tgt_labels, valid = (
      jnp.repeat(x, num_groups, axis=0) for x in (tgt_boxes, tgt_labels, valid)
    )

  target_index = matching.match(
    jax.lax.stop_gradient(logits),
    jax.lax.stop_gradient(pred_boxes),
    matching.Targets(tgt_boxes, tgt_labels, valid),
    config.matcher,
  ).target_index
  matched = target_index >= 0  # (L, B, Q)
  slot = jnp.maximum(target_index, 0)
  # Per query: its matched target's label and box; unmatched queries get a dummy box
  # so the (masked-out) GIoU and its gradient are well defined.
  q_labels = jnp.take_along_axis(tgt_labels[None], slot, axis=-1)  # (L, B, Q)
  q_boxes = jnp.take_along_axis(tgt_boxes[None], slot[..., None], axis=-2)
  q_boxes = jnp.where(matched[..., None], q_boxes, 0.5)  # (L, B, Q, 4)

  onehot = jax.nn.one_hot(jnp.where(matched, q_labels, -1), num_classes)
  focal = sigmoid_focal_loss(logits, onehot, config.loss.focal_alpha, config.loss.focal_gamma)
  # The original's .mean(1).sum() / num_boxes * num_queries is this sum.
  loss_ce = focal.sum((1, 2, 3)) / norm
  l1 = jnp.abs(pred_boxes - q_boxes).sum(-1)
  loss_bbox = jnp.where(matched, l1, 0.0).sum((1, 2)) / norm
  giou = box_ops.generalized_box_iou(
    box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(q_boxes)
  )
  loss_giou = jnp.where(matched, 1 - giou, 0.0).sum((1, 2)) / norm

  # Logged only. The original counts queries whose argmax is not the last class, a
  # leftover of softmax DETR's "no object" column; with sigmoid classes (COCO: the
  # last one is category 90, toothbrush) it counts nearly every query. Kept as is.
  card_pred = (logits.argmax(-1) != num_classes - 1).sum(-1)  # (L, B)
  cardinality = jnp.abs(card_pred - valid.sum(-1)).astype(jnp.float32).mean(-1)
  correct = (logits[-1].argmax(-1) == q_labels[-1]) & matched[-1]
  # 100 - top-1 accuracy over matched queries; 100 when there are none, as the original.
  class_error = 100 - 100 * correct.sum() / jnp.maximum(matched[-1].sum(), 1)

  weights = {
    "loss_ce": config.loss.ce_weight,
    "loss_bbox": config.loss.bbox_weight,
    "loss_giou": config.loss.giou_weight,
  }
  per_layer = {
    "loss_ce": loss_ce,
    "loss_bbox": loss_bbox,
    "loss_giou": loss_giou,
    "cardinality_error": jax.lax.stop_gradient(cardinality),
  }
  losses = {"class_error": jax.lax.stop_gradient(class_error)}
  total = jnp.zeros((), jnp.float32)
  for layer in range(num_layers):
    suffix = "" if layer == num_layers - 1 else f"_{layer}"
    for name, values in per_layer.items():
      losses[name + suffix] = values[layer]
    for name in _TERMS:
      total += weights[name] * losses[name + suffix]
  if "dense_outputs" in out:
    # The dense head's targets are the batch's own (not repeated per group).
    dense = dense_losses.dense_losses(
      out["dense_outputs"],
      batch["boxes"].astype(jnp.float32),
      batch["labels"].astype(jnp.int32),
      batch["box_valid"].astype(bool),
      norm,
      config.loss,
    )
    dense_weight = config.loss.dense_weight
    for name, value in dense.items():
      losses[name] = value
      total += dense_weight * weights[name.removesuffix("_dense")] * value
  losses["loss"] = total
  return losses
