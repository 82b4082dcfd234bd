"""Matching: the cost is the original's, the device solver is exact, padding never matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
import torch
from transformers.loss import loss_deformable_detr as hf

from conddetr_jax.criterion import matching
from configs import default

SOLVERS = ("hungarian", "scipy")


def _matcher_config(solver="hungarian"):
  config = default.get_config().matcher
  config.solver = solver
  return config


def _solve(cost, valid, solver):
  return np.asarray(jax.jit(matching.solve, static_argnums=2)(cost, valid, solver))


def _check_optimal(cost, valid, assignment):
  """One query per valid slot, none for padding, at scipy's optimal total cost."""
  cost = np.asarray(cost, np.float64)
  for k in np.ndindex(cost.shape[:-2]):
    slots = np.flatnonzero(valid[k])
    queries = np.flatnonzero(assignment[k] >= 0)
    assert sorted(assignment[k][queries]) == list(slots)
    sub = cost[k][:, slots]
    rows, cols = optimize.linear_sum_assignment(sub)
    optimum = sub[rows, cols].sum()
    total = cost[k][queries, assignment[k][queries]].sum()
    assert abs(total - optimum) <= 1e-5 * max(1.0, abs(optimum)), (k, total, optimum)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("num_queries, num_slots", [(12, 5), (9, 9)])
@pytest.mark.parametrize("ties", [False, True])
def test_solver_reaches_scipy_optimum(solver, num_queries, num_slots, ties):
  rng = np.random.default_rng(num_queries + 2 * num_slots + ties)
  shape = (3, 8, num_queries, num_slots)
  if ties:  # Few distinct values: many optimal assignments.
    cost = rng.integers(0, 3, shape).astype(np.float32)
  else:
    cost = rng.normal(0, 3, shape).astype(np.float32)
  valid = rng.random(shape[:2] + (num_slots,)) < 0.6
  valid[0, 0] = False  # No targets.
  valid[0, 1] = True  # All slots valid (as many targets as queries when square).
  _check_optimal(cost, valid, _solve(cost, valid, solver))


@pytest.mark.parametrize("solver", SOLVERS)
def test_padding_slots_do_not_change_the_valid_assignment(solver):
  rng = np.random.default_rng(3)
  cost = rng.normal(0, 3, (16, 10, 6)).astype(np.float32)
  valid = rng.random((16, 6)) < 0.5
  # Garbage, even non-finite, in padding columns must not matter.
  garbage = cost.copy()
  garbage[~np.broadcast_to(valid[:, None, :], cost.shape)] = np.nan
  garbage[:, ::2][~np.broadcast_to(valid[:, None, :], cost[:, ::2].shape)] = -1e4
  assignment = _solve(garbage, valid, solver)
  for k in range(16):
    # Continuous costs: the optimum over the valid slots alone is unique.
    slots = np.flatnonzero(valid[k])
    rows, cols = optimize.linear_sum_assignment(cost[k][:, slots])
    expected = np.full(10, -1)
    expected[rows] = slots[cols]
    np.testing.assert_array_equal(assignment[k], expected)


def test_more_slots_than_queries_is_rejected():
  with pytest.raises(ValueError, match="exceed"):
    matching.solve(jnp.zeros((4, 5)), jnp.ones(5, bool))


def test_cost_matrix_is_the_original_formula():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (2, 5, 3)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.6, (2, 5, 4)).astype(np.float32)
  tgt_boxes = rng.uniform(0.2, 0.6, (2, 4, 4)).astype(np.float32)
  tgt_labels = rng.integers(0, 3, (2, 4))
  valid = np.array([[True, True, False, True], [False] * 4])
  cost = np.asarray(
    matching.cost_matrix(
      logits, boxes, matching.Targets(tgt_boxes, tgt_labels, valid), _matcher_config()
    )
  )
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p**2 * -np.log(1 - p + 1e-8)

  def xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

  for b in range(2):
    for q in range(5):
      for m in np.flatnonzero(valid[b]):
        p1, p2 = xyxy(boxes[b, q]), xyxy(tgt_boxes[b, m])
        inter = np.prod(np.clip(np.minimum(p1[2:], p2[2:]) - np.maximum(p1[:2], p2[:2]), 0, None))
        union = np.prod(p1[2:] - p1[:2]) + np.prod(p2[2:] - p2[:2]) - inter
        hull = np.prod(np.maximum(p1[2:], p2[2:]) - np.minimum(p1[:2], p2[:2]))
        giou = inter / union - (hull - union) / hull
        expected = (
          2 * focal[b, q, tgt_labels[b, m]]
          + 5 * np.abs(boxes[b, q] - tgt_boxes[b, m]).sum()
          - 2 * giou
        )
        np.testing.assert_allclose(cost[b, q, m], expected, rtol=1e-5, atol=1e-6)
  assert (cost[~np.broadcast_to(valid[:, None, :], cost.shape)] == 0).all()


def test_class_cost_picks_each_target_s_class_over_leading_axes_without_a_gather():
  """(layers, batch) leading axes and 91 classes: every column is its target's class's focal cost
  (to float32 rounding, so the one-hot product must not lose precision), and the program has no
  gather, which the TPU program ran as 2.29 GB of traffic per chip for R50
  (docs/accelerators.md)."""
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 2, (3, 2, 6, 91)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.6, (3, 2, 6, 4)).astype(np.float32)
  labels = rng.integers(0, 91, (3, 2, 5))
  targets = matching.Targets(
    rng.uniform(0.2, 0.6, (3, 2, 5, 4)).astype(np.float32), labels, np.ones((3, 2, 5), bool)
  )
  config = _matcher_config()
  config.cost_bbox, config.cost_giou = 0.0, 0.0
  cost = np.asarray(matching.cost_matrix(logits, boxes, targets, config))

  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p**2 * -np.log(1 - p + 1e-8)
  picked = np.take_along_axis(focal, np.broadcast_to(labels[..., None, :], (3, 2, 6, 5)), -1)
  np.testing.assert_allclose(cost, config.cost_class * picked, rtol=1e-5, atol=1e-6)
  lowered = jax.jit(lambda *args: matching.cost_matrix(*args, config)).lower(logits, boxes, targets)
  assert "gather" not in lowered.as_text()


@pytest.mark.parametrize("solver", SOLVERS)
def test_all_layers_match_as_hugging_face_matches_each(solver):
  rng = np.random.default_rng(5)
  layers, batch, queries, classes, slots = 3, 4, 12, 6, 5
  logits = rng.normal(-1, 2, (layers, batch, queries, classes)).astype(np.float32)
  boxes = rng.uniform(0.15, 0.85, (layers, batch, queries, 4)).astype(np.float32)
  tgt_boxes = rng.uniform(0.1, 0.5, (batch, slots, 4)).astype(np.float32)
  tgt_labels = rng.integers(0, classes, (batch, slots)).astype(np.int32)
  valid = np.array([[1, 1, 0, 1, 0], [0] * 5, [1] * 5, [0, 0, 0, 0, 1]], bool)
  tgt_boxes[~valid] = 0.0  # Padding as the batcher writes it.

  match = jax.jit(lambda *a: matching.match(*a, _matcher_config(solver)))
  targets = matching.Targets(tgt_boxes, tgt_labels, valid)
  target_index = np.asarray(match(logits, boxes, targets).target_index)

  reference = hf.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
  targets = [
    {
      "class_labels": torch.from_numpy(tgt_labels[b][valid[b]]).long(),
      "boxes": torch.from_numpy(tgt_boxes[b][valid[b]]),
    }
    for b in range(batch)
  ]
  for layer in range(layers):
    indices = reference(
      {"logits": torch.from_numpy(logits[layer]), "pred_boxes": torch.from_numpy(boxes[layer])},
      targets,
    )
    for b, (query, target) in enumerate(indices):
      expected = np.full(queries, -1)
      expected[query.numpy()] = np.flatnonzero(valid[b])[target.numpy()]
      np.testing.assert_array_equal(target_index[layer, b], expected)
