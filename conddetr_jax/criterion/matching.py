"""Hungarian matching of predictions to padded targets, batched on device.

The cost is the original's: ``cost_class * focal + cost_bbox * L1(cxcywh) +
cost_giou * (-GIoU)``. Every (decoder layer, image) pair is one assignment problem;
all of them are solved in one call, either on device (``solver="hungarian"``) or on
the host by scipy through ``jax.pure_callback`` (``solver="scipy"``, the reference).

Target slots whose ``valid`` flag is False are padding. They never take part in the
assignment: the device solver skips them and the scipy solver drops their columns,
so the valid targets are matched exactly as the original matches the unpadded
targets. The result has a fixed shape: for each query, the matched target slot or -1.

Why not ``optax.assignment.hungarian_algorithm``: it solves one row per target slot,
padding included, and constant-cost padding rows make its augmenting-path search
revisit every previously matched query (all tied), so its run time grows with the
square of the padded slot count. For 16 images x 6 layers x 300 queries x 100 slots
with 7 valid targets per image it took 1.2 s on CPU, 25 times the solver below (see
benchmarks/matching.py), which is the same shortest-augmenting-path Hungarian method
with its row loop bounded by the number of valid targets.

Sharding: under ``jax.jit`` with the batch axis sharded, each device solves the
problems of its own images (nothing is gathered); the loops then agree on when to
stop through one scalar all-reduce per iteration. Inside ``shard_map``/``pmap`` the
loops are purely local. The scipy solver always runs on the host with the whole
cost matrix.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import optimize

from conddetr_jax.criterion import boxes as box_ops

# The original's matcher fixes the focal cost's alpha and gamma, whatever
# --focal_alpha says; keep them here rather than in the config.
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Stand-in for non-finite costs (a diverged model): finite, so both solvers still
# terminate (the device solver's search needs finite reduced costs), and large, so
# such pairs are matched last, as in Hugging Face's matcher.
_NONFINITE_COST = 1e8


class Matching(NamedTuple):
  """A fixed-shape matching.

  Attributes:
    target_index: (..., Q) int32, the target slot matched to each query, -1 if none.
  """

  target_index: jax.Array

  @property
  def matched(self) -> jax.Array:
    """(..., Q) bool: whether the query is matched to a (valid) target."""
    return self.target_index >= 0


class Targets(NamedTuple):
  """Each image's target set, padded to M slots (the batch's boxes, labels and box_valid).

  Attributes:
    boxes: (..., M, 4) cxcywh boxes; may hold garbage where not valid.
    labels: (..., M) int class ids; may hold garbage where not valid.
    valid: (..., M) bool, False on padding slots.
  """

  boxes: jax.Array
  labels: jax.Array
  valid: jax.Array

  @classmethod
  def of_batch(cls, batch: Mapping[str, jax.Array]) -> "Targets":
    """The targets of a batch (``data.batch_spec``'s layout)."""
    return cls(batch["boxes"], batch["labels"], batch["box_valid"])


def cost_matrix(
  pred_logits: jax.Array,
  pred_boxes: jax.Array,
  targets: Targets,
  config: ml_collections.ConfigDict,
) -> jax.Array:
  """The original matcher's cost of assigning each query to each target slot.

  Args:
    pred_logits: (..., Q, C) class logits.
    pred_boxes: (..., Q, 4) cxcywh boxes.
    targets: the target slots, with leading axes (...) as the predictions'.
    config: ``config.matcher`` (cost_class, cost_bbox, cost_giou).

  Returns:
    (..., Q, M) float32 cost; 0 in padding columns (the solvers ignore them).
  """
  pred_logits = pred_logits.astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  tgt_valid = targets.valid
  # Padding slots get a harmless stand-in so garbage (even NaN) can't reach any
  # arithmetic.
  tgt_boxes = jnp.where(tgt_valid[..., None], targets.boxes.astype(jnp.float32), 0.5)
  tgt_labels = jnp.where(tgt_valid, targets.labels, 0)

  prob = jax.nn.sigmoid(pred_logits)
  pos = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * -jnp.log(prob + 1e-8)
  neg = (1 - FOCAL_ALPHA) * prob**FOCAL_GAMMA * -jnp.log(1 - prob + 1e-8)
  # Each target's column picks its class's cost: a product with the one-hot labels rather than a
  # gather, which the TPU program runs as far more traffic than a small matmul (the matching
  # alone, compiled for v5e: 2.29 GB per chip for R50's 2 images before, 0.17 after;
  # docs/accelerators.md). HIGHEST keeps the picked values exact: the one-hot factor is 0 or 1
  # and the sum has one nonzero term.
  one_hot = jax.nn.one_hot(tgt_labels, pred_logits.shape[-1], dtype=jnp.float32)
  class_cost = jnp.einsum(
    "...qc,...mc->...qm", pos - neg, one_hot, precision=jax.lax.Precision.HIGHEST
  )
  bbox_cost = jnp.abs(pred_boxes[..., :, None, :] - tgt_boxes[..., None, :, :]).sum(-1)
  giou_cost = -box_ops.pairwise_generalized_box_iou(
    box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(tgt_boxes)
  )
  cost = (
    config.cost_class * class_cost + config.cost_bbox * bbox_cost + config.cost_giou * giou_cost
  )
  return jnp.where(tgt_valid[..., None, :], cost, 0.0)


def _hungarian_single(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """Minimum-cost matching of the valid targets of one problem, on device.

  Shortest augmenting paths with dual potentials (the Hungarian method in its
  Jonker-Volgenant form): targets are added one at a time, and each addition runs a
  Dijkstra search over the queries on reduced costs. Only valid targets are added,
  so padding costs nothing.

  Args:
    cost: (Q, M) float32.
    valid: (M,) bool.

  Returns:
    (Q,) int32, the matched target slot of each query or -1.
  """
  num_queries, num_slots = cost.shape
  # Row r of `rows` is the r-th valid target slot (valid slots first, in order).
  order = jnp.argsort(~valid, stable=True)
  rows = cost.T[order]
  num_rows = valid.sum()
  big = jnp.asarray(jnp.inf, cost.dtype)

  # Column 0 is a virtual query that holds the row being added; queries are 1..Q.
  # owner[j]: 1 + the row matched to column j (0 = free). u, v: dual potentials.
  def add_row(state):
    r, u, v, owner = state
    owner = owner.at[0].set(r + 1)

    def search_step(s):
      u, v, used, min_reduced, via, col = s
      used = used.at[col].set(True)
      row = owner[col] - 1
      free = ~used[1:]
      reduced = rows[row] - u[row] - v[1:]
      better = free & (reduced < min_reduced)
      min_reduced = jnp.where(better, reduced, min_reduced)
      via = jnp.where(better, col, via)
      candidates = jnp.where(free, min_reduced, big)
      nxt = jnp.argmin(candidates) + 1
      delta = candidates[nxt - 1]
      # Shift the duals so the reduced costs stay >= 0 on the search tree; rows of
      # unused columns are left out (scattered to an out-of-range index).
      u = u.at[jnp.where(used, owner - 1, num_slots)].add(delta, mode="drop")
      v = jnp.where(used, v - delta, v)
      min_reduced = jnp.where(free, min_reduced - delta, min_reduced)
      return u, v, used, min_reduced, via, nxt

    init = (
      u,
      v,
      jnp.zeros(num_queries + 1, bool),
      jnp.full(num_queries, big),
      jnp.zeros(num_queries, jnp.int32),
      jnp.int32(0),
    )
    u, v, _, _, via, col = jax.lax.while_loop(lambda s: owner[s[-1]] != 0, search_step, init)

    # Walk the path back to the virtual column, shifting each match along it.
    def augment(s):
      owner, col = s
      prev = via[col - 1]
      return owner.at[col].set(owner[prev]), prev

    owner, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment, (owner, col))
    return r + 1, u, v, owner

  init = (
    jnp.int32(0),
    jnp.zeros(num_slots, cost.dtype),
    jnp.zeros(num_queries + 1, cost.dtype),
    jnp.zeros(num_queries + 1, jnp.int32),
  )
  _, _, _, owner = jax.lax.while_loop(lambda s: s[0] < num_rows, add_row, init)
  owner = owner[1:]
  return jnp.where(owner > 0, order[jnp.maximum(owner - 1, 0)], -1).astype(jnp.int32)


def _scipy_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side of the scipy solver: (..., Q, M), (..., M) -> (..., Q) int32."""
  cost, valid = np.asarray(cost), np.asarray(valid)
  lead = cost.shape[:-2]
  cost = cost.reshape((-1,) + cost.shape[-2:])
  valid = np.broadcast_to(valid, lead + valid.shape[-1:]).reshape(-1, valid.shape[-1])
  out = np.full(cost.shape[:2], -1, np.int32)
  for k in range(cost.shape[0]):
    slots = np.flatnonzero(valid[k])
    queries, cols = optimize.linear_sum_assignment(cost[k][:, slots])
    out[k, queries] = slots[cols]
  return out.reshape(lead + cost.shape[1:2])


def solve(cost: jax.Array, valid: jax.Array, solver: str = "hungarian") -> jax.Array:
  """Minimum-cost one-to-one assignment of valid target slots to queries.

  Args:
    cost: (..., Q, M) float cost; padding columns may hold anything finite.
    valid: (..., M) bool, False on padding slots.
    solver: "hungarian" (on device, under jit) or "scipy" (host callback).

  Returns:
    (..., Q) int32, the target slot matched to each query, -1 if none. Every valid
    slot is matched to exactly one query; padding slots to none.
  """
  num_queries, num_slots = cost.shape[-2:]
  if num_slots > num_queries:
    # With more slots than queries some valid targets could go unmatched; the batch
    # builder's max_boxes must not exceed num_queries.
    raise ValueError(f"{num_slots} target slots exceed {num_queries} queries")
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  cost = jnp.where(jnp.isfinite(cost), cost, _NONFINITE_COST)
  valid = jnp.broadcast_to(valid, cost.shape[:-2] + (num_slots,))
  if solver == "hungarian":
    # One vmap per leading axis rather than one over their flattened product: merging
    # axes would make a sharded batch axis gather onto every device.
    fn = _hungarian_single
    for _ in cost.shape[:-2]:
      fn = jax.vmap(fn)
    return fn(cost, valid)
  if solver == "scipy":
    out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(_scipy_host, out_shape, cost, valid, vmap_method="broadcast_all")
  raise ValueError(f"unknown matcher solver {solver!r}")


def match(
  pred_logits: jax.Array, pred_boxes: jax.Array, targets: Targets, config: ml_collections.ConfigDict
) -> Matching:
  """Matches every decoder layer's predictions to the targets in one batched call.

  Args:
    pred_logits: (L, B, Q, C) logits of L decoder layers.
    pred_boxes: (L, B, Q, 4) cxcywh boxes.
    targets: the B images' target slots (B, M, ...).
    config: ``config.matcher`` (cost_class, cost_bbox, cost_giou, solver).

  Returns:
    Matching with target_index (L, B, Q). No gradient flows through it.
  """
  cost = cost_matrix(pred_logits, pred_boxes, targets, config)
  return Matching(solve(cost, targets.valid, config.solver))
