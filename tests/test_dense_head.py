"""The dense auxiliary head (config.model.dense_head): token assignment, its losses against a
per-token loop, inference unchanged, and a training step that updates the head."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conddetr_jax import models
from conddetr_jax.criterion import dense_losses, losses
from conddetr_jax.models.detector import token_centres
from configs import test_tiny
from tests.test_training_step import _batch, _Run


def _config(dense_head: bool = True) -> ml_collections.ConfigDict:
  config = test_tiny.get_config()
  config.model.update(dense_head=dense_head, dropout=0.0)
  return config


def _grid_centres(h: int, w: int) -> np.ndarray:
  """(1, h*w, 2) centres of an unpadded h x w grid, row-major, as (x, y)."""
  ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  return np.stack([xs, ys], -1).reshape(1, h * w, 2).astype(np.float32)


def test_token_centres_follow_the_valid_extent_of_each_image():
  mask = np.zeros((2, 4, 8), bool)
  mask[1, :, 4:] = True  # image 1: only the left half is the image
  mask[1, 3:, :] = True  # and its last row is padding
  centres = np.asarray(token_centres(jnp.asarray(mask))).reshape(2, 4, 8, 2)
  np.testing.assert_allclose(centres[0, 0, :, 0], (np.arange(8) + 0.5) / 8)
  np.testing.assert_allclose(centres[0, :, 0, 1], (np.arange(4) + 0.5) / 4)
  np.testing.assert_allclose(centres[1, 0, :4, 0], (np.arange(4) + 0.5) / 4)
  np.testing.assert_allclose(centres[1, :3, 0, 1], (np.arange(3) + 0.5) / 3)


def test_assignment_inside_boxes_nearest_for_small_ones_smallest_box_wins():
  centres = _grid_centres(4, 4)  # centres at 0.125, 0.375, 0.625, 0.875
  token_valid = np.ones((1, 16), bool)
  token_valid[0, 15] = False  # the bottom-right token is padding
  boxes = np.array(
    [
      [
        [0.5, 0.5, 0.6, 0.6],  # holds the middle 2x2 tokens (5, 6, 9, 10)
        [0.4, 0.4, 0.3, 0.3],  # smaller, holds token 5 only: takes it
        [0.14, 0.86, 0.02, 0.02],  # holds no centre: its nearest token (12)
        [0.8, 0.95, 0.05, 0.05],  # nearest token (15) is padding: the nearest valid one (14)
        [0.5, 0.5, 1.0, 1.0],
      ]
    ],
    np.float32,
  )  # an invalid slot: assigned nothing
  box_valid = np.array([[True, True, True, True, False]])
  slot, counts = dense_losses.assign_tokens(
    jnp.asarray(centres), jnp.asarray(token_valid), jnp.asarray(boxes), jnp.asarray(box_valid)
  )
  expected = np.full(16, -1)
  expected[[6, 9, 10]] = 0
  expected[5] = 1
  expected[12] = 2
  expected[14] = 3
  np.testing.assert_array_equal(np.asarray(slot)[0], expected)
  np.testing.assert_array_equal(np.asarray(counts)[0], [3, 1, 1, 1, 0])


def _loop_losses(logits, pred, slot, token_valid, boxes, labels, norm, alpha, gamma):
  """The dense terms token by token, in plain numpy (focal and GIoU written out here)."""
  counts = {m: int((slot == m).sum()) for m in set(slot.tolist()) if m >= 0}
  ce = l1 = giou_loss = 0.0
  for t in range(len(slot)):
    if not token_valid[t]:
      continue
    m = slot[t]
    weight = 1.0 / counts[m] if m >= 0 else 1.0
    for c in range(logits.shape[-1]):
      y = 1.0 if m >= 0 and labels[m] == c else 0.0
      p = 1 / (1 + np.exp(-logits[t, c]))
      p_t = p if y else 1 - p
      ce += weight * (alpha if y else 1 - alpha) * -np.log(p_t) * (1 - p_t) ** gamma
    if m < 0:
      continue
    a = np.concatenate([pred[t, :2] - pred[t, 2:] / 2, pred[t, :2] + pred[t, 2:] / 2])
    b = np.concatenate([boxes[m, :2] - boxes[m, 2:] / 2, boxes[m, :2] + boxes[m, 2:] / 2])
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    hull = np.prod(np.maximum(a[2:], b[2:]) - np.minimum(a[:2], b[:2]))
    l1 += weight * np.abs(pred[t] - boxes[m]).sum()
    giou_loss += weight * (1 - (inter / union - (hull - union) / hull))
  return {
    "loss_ce_dense": ce / norm,
    "loss_bbox_dense": l1 / norm,
    "loss_giou_dense": giou_loss / norm,
  }


def test_dense_terms_match_a_per_token_loop_and_join_the_total_with_their_weights():
  rng = np.random.default_rng(0)
  h = w = 4
  tokens, classes = h * w, 6
  logits = rng.normal(size=(1, tokens, classes)).astype(np.float32)
  pred = np.concatenate(
    [rng.uniform(0.3, 0.7, (1, tokens, 2)), rng.uniform(0.1, 0.5, (1, tokens, 2))], -1
  ).astype(np.float32)
  token_valid = np.ones((1, tokens), bool)
  token_valid[0, -2:] = False
  boxes = np.array([[[0.5, 0.5, 0.6, 0.6], [0.2, 0.8, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]]], np.float32)
  labels = np.array([[3, 1, 0]], np.int32)
  box_valid = np.array([[True, True, False]])
  dense = {
    "pred_logits": jnp.asarray(logits),
    "pred_boxes": jnp.asarray(pred),
    "token_centres": jnp.asarray(_grid_centres(h, w)),
    "token_valid": jnp.asarray(token_valid),
  }
  config = _config()
  config.loss.dense_weight = 0.5
  norm = 2.0  # the box count, as set_criterion computes it
  got = dense_losses.dense_losses(
    dense,
    jnp.asarray(boxes),
    jnp.asarray(labels),
    jnp.asarray(box_valid),
    jnp.float32(norm),
    config.loss,
  )
  slot, _ = dense_losses.assign_tokens(
    dense["token_centres"], dense["token_valid"], jnp.asarray(boxes), jnp.asarray(box_valid)
  )
  expected = _loop_losses(
    logits[0],
    pred[0],
    np.asarray(slot)[0],
    token_valid[0],
    boxes[0],
    labels[0],
    norm,
    config.loss.focal_alpha,
    config.loss.focal_gamma,
  )
  for name in dense_losses.TERMS:
    np.testing.assert_allclose(float(got[name]), expected[name], rtol=1e-5, err_msg=name)

  # In the set criterion: the decoder's total plus dense_weight x each term's decoder weight.
  q = config.model.num_queries
  out = {
    "pred_logits": jnp.asarray(rng.normal(size=(1, q, classes)), jnp.float32),
    "pred_boxes": jnp.full((1, q, 4), 0.4, jnp.float32),
    "aux_outputs": [],
  }
  batch = {
    "boxes": jnp.asarray(boxes),
    "labels": jnp.asarray(labels),
    "box_valid": jnp.asarray(box_valid),
  }
  without = losses.set_criterion(out, batch, config)
  with_dense = losses.set_criterion({**out, "dense_outputs": dense}, batch, config)
  added = 0.5 * (
    config.loss.ce_weight * got["loss_ce_dense"]
    + config.loss.bbox_weight * got["loss_bbox_dense"]
    + config.loss.giou_weight * got["loss_giou_dense"]
  )
  np.testing.assert_allclose(float(with_dense["loss"]), float(without["loss"] + added), rtol=1e-5)
  for name in dense_losses.TERMS:
    np.testing.assert_allclose(float(with_dense[name]), float(got[name]), rtol=1e-6)


def test_inference_is_unchanged_by_the_head_and_training_outputs_carry_it():
  config = _config()
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  assert {"dense_class_embed", "dense_bbox_embed"} <= set(variables["params"])
  plain = models.build_model(_config(dense_head=False))
  without_head = {
    **variables,
    "params": {k: v for k, v in variables["params"].items() if not k.startswith("dense_")},
  }
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  pad_mask = jnp.zeros((2, 64, 64), bool).at[1, :, 32:].set(True)

  out = model.apply(variables, images, pad_mask, train=False)
  assert "dense_outputs" not in out
  jax.tree.map(
    np.testing.assert_array_equal, out, plain.apply(without_head, images, pad_mask, train=False)
  )

  dense = model.apply(variables, images, pad_mask, train=True)["dense_outputs"]
  tokens = dense["token_valid"].shape[1]
  assert dense["pred_logits"].shape == (2, tokens, config.model.num_classes)
  assert dense["pred_boxes"].shape == (2, tokens, 4)
  # Image 1's right half is padding: half its tokens are invalid. At init the box head's last layer
  # is zero, so each box is centred on its token.
  assert (
    int(dense["token_valid"][0].sum()) == tokens
    and int(dense["token_valid"][1].sum()) == tokens // 2
  )
  valid = np.asarray(dense["token_valid"])
  np.testing.assert_allclose(
    np.asarray(dense["pred_boxes"])[..., :2][valid],
    np.asarray(dense["token_centres"])[valid],
    atol=1e-5,
  )


def test_a_training_step_with_the_head_updates_it_and_the_backbone():
  run = _Run(dense_head=True, dropout=0.0)
  before = jax.device_get(run.state.params)
  metrics = run.step(_batch(0))
  assert metrics["finite"] and all(
    np.isfinite(metrics[name]) and metrics[name] > 0 for name in dense_losses.TERMS
  )
  after = jax.device_get(run.state.params)
  for name in ("dense_class_embed", "dense_bbox_embed", "backbone"):
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before[name], after[name])
    assert max(jax.tree.leaves(moved)) > 0, name


def test_zero_weight_leaves_the_decoder_loss():
  config = _config()
  config.loss.dense_weight = 0.0
  batch = _batch(0)
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  out = model.apply(variables, batch["image"], batch["pad_mask"], train=True)
  with_dense = losses.set_criterion(out, batch, config)
  decoder_only = losses.set_criterion(
    {k: v for k, v in out.items() if k != "dense_outputs"}, batch, config
  )
  np.testing.assert_allclose(float(with_dense["loss"]), float(decoder_only["loss"]), rtol=1e-6)
