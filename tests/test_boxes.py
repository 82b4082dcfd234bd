"""Box conversions, IoU and GIoU: values against an independent implementation, safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss import loss_for_object_detection as hf

from conddetr_jax.criterion import boxes as box_ops


def _random_xyxy(rng, n):
  lo = rng.uniform(0, 0.7, (n, 2))
  return np.concatenate([lo, lo + rng.uniform(0.01, 0.3, (n, 2))], axis=1).astype(np.float32)


def test_conversions_round_trip():
  rng = np.random.default_rng(0)
  xyxy = _random_xyxy(rng, 20)
  cxcywh = box_ops.xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(cxcywh[:, 2:], xyxy[:, 2:] - xyxy[:, :2], rtol=1e-6)
  np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-7)


def test_area_of_inverted_box_is_zero():
  boxes = jnp.array([[0.0, 0.0, 0.5, 0.2], [0.5, 0.5, 0.4, 0.9]])
  np.testing.assert_allclose(box_ops.area(boxes), [0.1, 0.0], rtol=1e-6)


def test_pairwise_iou_and_giou_match_hugging_face():
  rng = np.random.default_rng(1)
  a, b = _random_xyxy(rng, 7), _random_xyxy(rng, 5)
  iou_ref, _ = hf.box_iou(torch.from_numpy(a), torch.from_numpy(b))
  giou_ref = hf.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b))
  np.testing.assert_allclose(box_ops.pairwise_box_iou(a, b), iou_ref.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    box_ops.pairwise_generalized_box_iou(a, b), giou_ref.numpy(), rtol=1e-5, atol=1e-7
  )


def test_elementwise_is_the_pairwise_diagonal():
  rng = np.random.default_rng(2)
  a, b = _random_xyxy(rng, 6), _random_xyxy(rng, 6)
  np.testing.assert_allclose(
    box_ops.box_iou(a, b), np.diag(box_ops.pairwise_box_iou(a, b)), rtol=1e-6
  )
  np.testing.assert_allclose(
    box_ops.generalized_box_iou(a, b),
    np.diag(box_ops.pairwise_generalized_box_iou(a, b)),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  "a, b, iou, giou",
  [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # union 2, hull 3
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # inter 1, union 7, hull 9
  ],
)
def test_hand_computed_values(a, b, iou, giou):
  a, b = jnp.array(a, jnp.float32), jnp.array(b, jnp.float32)
  np.testing.assert_allclose(box_ops.box_iou(a, b), iou, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(box_ops.generalized_box_iou(a, b), giou, rtol=1e-6)


def test_degenerate_boxes_give_finite_values_and_gradients():
  # cxcywh: zero width, zero height, an all-zero padding slot, a point, and a normal box.
  boxes = jnp.array(
    [
      [0.5, 0.5, 0.0, 0.2],
      [0.3, 0.3, 0.2, 0.0],
      [0.0, 0.0, 0.0, 0.0],
      [0.5, 0.5, 0.0, 0.0],
      [0.4, 0.6, 0.2, 0.3],
    ]
  )

  def total(a, b):
    xa, xb = box_ops.cxcywh_to_xyxy(a), box_ops.cxcywh_to_xyxy(b)
    return (
      box_ops.pairwise_generalized_box_iou(xa, xb).sum()
      + box_ops.pairwise_box_iou(xa, xb).sum()
      + box_ops.generalized_box_iou(xa, xb).sum()
    )

  values = box_ops.pairwise_generalized_box_iou(
    box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(boxes)
  )
  assert np.isfinite(values).all()
  assert (np.asarray(values) >= -1).all() and (np.asarray(values) <= 1).all()
  grads = jax.grad(total, argnums=(0, 1))(boxes, boxes)
  assert all(np.isfinite(g).all() for g in grads)
