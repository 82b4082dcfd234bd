"""Box format conversions, areas, IoU and generalized IoU (pure jnp).

Boxes are either ``cxcywh`` (centre x, centre y, width, height) or ``xyxy`` (x0, y0,
x1, y1); the last axis holds the four coordinates and any leading axes broadcast.

The original asserts that boxes are well formed and returns NaN for degenerate ones
(zero width or height, and the all-zero boxes found in padding slots). Here every
division has a floor on its denominator, so values and gradients stay finite for
any input; for boxes whose areas are above the floor the results equal the
original's exactly.
"""

import jax
import jax.numpy as jnp

# Floor for areas used as denominators. Far below the area of a one-pixel box in a
# 2000x2000 image (2.5e-7 in normalised units), so real boxes never reach it, and
# large enough that gradients through 1/area stay well inside float32 range.
_EPS = 1e-12


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(..., 4) cxcywh -> (..., 4) xyxy."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(..., 4) xyxy -> (..., 4) cxcywh."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(boxes: jax.Array) -> jax.Array:
  """(..., 4) xyxy -> (...,) area; inverted boxes count as empty, not negative."""
  wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return wh[..., 0] * wh[..., 1]


def _iou_and_giou(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU and GIoU of xyxy boxes that broadcast against each other: (..., 4) -> (...,)."""
  inter_wh = jnp.maximum(
    jnp.minimum(boxes1[..., 2:], boxes2[..., 2:]) - jnp.maximum(boxes1[..., :2], boxes2[..., :2]),
    0.0,
  )
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area(boxes1) + area(boxes2) - inter
  iou = inter / jnp.maximum(union, _EPS)
  hull_wh = jnp.maximum(
    jnp.maximum(boxes1[..., 2:], boxes2[..., 2:]) - jnp.minimum(boxes1[..., :2], boxes2[..., :2]),
    0.0,
  )
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  giou = iou - (hull - union) / jnp.maximum(hull, _EPS)
  return iou, giou


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Elementwise IoU of xyxy boxes: (..., 4), (..., 4) -> (...,)."""
  return _iou_and_giou(boxes1, boxes2)[0]


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Elementwise generalized IoU of xyxy boxes: (..., 4), (..., 4) -> (...,) in [-1, 1]."""
  return _iou_and_giou(boxes1, boxes2)[1]


def pairwise_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """IoU of every pair of xyxy boxes: (..., N, 4), (..., M, 4) -> (..., N, M)."""
  return box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def pairwise_generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Generalized IoU of every pair of xyxy boxes: (..., N, 4), (..., M, 4) -> (..., N, M)."""
  return generalized_box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
