"""Set criterion: term-by-term parity with Hugging Face, focal loss, normalisation, safety."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import ConditionalDetrConfig
from transformers.loss import loss_deformable_detr as hf
from transformers.loss import loss_for_object_detection as hf_base

from conddetr_jax.criterion import losses
from configs import default

LAYERS, BATCH, QUERIES, CLASSES, SLOTS = 3, 4, 12, 6, 5


def _config(solver="hungarian", aux_loss=True):
  config = default.get_config()
  config.model.num_queries = QUERIES
  config.model.num_classes = CLASSES
  config.model.dec_layers = LAYERS
  config.model.aux_loss = aux_loss
  config.matcher.solver = solver
  return config


def _example(seed=0, valid=None):
  """Random per-layer outputs (L, B, Q, ...) and a padded batch with garbage padding."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(-2, 2, (LAYERS, BATCH, QUERIES, CLASSES)).astype(np.float32)
  boxes = rng.uniform(0.15, 0.85, (LAYERS, BATCH, QUERIES, 4)).astype(np.float32)
  tgt_boxes = rng.uniform(0.05, 0.5, (BATCH, SLOTS, 4)).astype(np.float32)
  labels = rng.integers(0, CLASSES, (BATCH, SLOTS)).astype(np.int32)
  if valid is None:  # Includes an image without boxes and one with every slot used.
    valid = np.array([[1, 1, 0, 1, 0], [0] * 5, [1] * 5, [0, 0, 0, 0, 1]], bool)
  tgt_boxes[~valid] = 0.0
  labels[~valid] = -1
  batch = {"boxes": tgt_boxes, "labels": labels, "box_valid": valid}
  return logits, boxes, batch


def _out(logits, boxes, aux_loss=True):
  out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
  if aux_loss:
    out["aux_outputs"] = [
      {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])
    ]
  return out


def _criterion(config):
  return jax.jit(lambda out, batch: losses.set_criterion(out, batch, config))


def _hf_targets(batch):
  valid = batch["box_valid"]
  return [
    {
      "class_labels": torch.from_numpy(batch["labels"][b][valid[b]]).long(),
      "boxes": torch.from_numpy(batch["boxes"][b][valid[b]]),
    }
    for b in range(len(valid))
  ]


@pytest.mark.parametrize("solver", ["hungarian", "scipy"])
def test_loss_terms_match_hugging_face(solver):
  logits, boxes, batch = _example()
  ours = _criterion(_config(solver))(_out(logits, boxes), batch)

  hf_config = ConditionalDetrConfig(num_labels=CLASSES, decoder_layers=LAYERS, auxiliary_loss=True)
  _, reference, _ = hf.DeformableDetrForObjectDetectionLoss(
    torch.from_numpy(logits[-1]),
    _hf_targets(batch),
    "cpu",
    torch.from_numpy(boxes[-1]),
    hf_config,
    torch.from_numpy(logits),
    torch.from_numpy(boxes),
  )
  names = [
    f"{term}{suffix}"
    for term in ("loss_ce", "loss_bbox", "loss_giou")
    for suffix in ("", "_0", "_1")
  ]
  for name in names:
    np.testing.assert_allclose(ours[name], reference[name].item(), rtol=1e-5, err_msg=name)
  # The original weighs the class term 2 where Hugging Face uses 1.
  weights = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
  total = sum(
    weights[name.rsplit("_", 1)[0] if name[-1].isdigit() else name] * reference[name].item()
    for name in names
  )
  np.testing.assert_allclose(ours["loss"], total, rtol=1e-5)


def test_logged_metrics_follow_the_original():
  logits, boxes, batch = _example(seed=1)
  ours = _criterion(_config())(_out(logits, boxes), batch)
  targets = _hf_targets(batch)
  for layer, suffix in [(0, "_0"), (1, "_1"), (2, "")]:
    # Hugging Face's base class keeps the original's cardinality formula.
    reference = hf_base.ImageLoss.loss_cardinality(
      None, {"logits": torch.from_numpy(logits[layer])}, targets, None, None
    )
    np.testing.assert_allclose(
      ours["cardinality_error" + suffix], reference["cardinality_error"].item(), rtol=1e-6
    )
  matcher = hf.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
  indices = matcher(
    {"logits": torch.from_numpy(logits[-1]), "pred_boxes": torch.from_numpy(boxes[-1])}, targets
  )
  correct = [
    logits[-1][b, q].argmax() == targets[b]["class_labels"][t].item()
    for b, (qs, ts) in enumerate(indices)
    for q, t in zip(qs.tolist(), ts.tolist())
  ]
  np.testing.assert_allclose(ours["class_error"], 100 - 100 * np.mean(correct), rtol=1e-5)
  assert "class_error_0" not in ours  # The original logs it for the final layer only.


def test_class_error_without_targets_is_100():
  logits, boxes, batch = _example(valid=np.zeros((BATCH, SLOTS), bool))
  ours = _criterion(_config())(_out(logits, boxes), batch)
  assert float(ours["class_error"]) == 100.0


def test_hand_computed_focal_loss():
  # One image, one query, two classes; the target (class 1) is matched to the query.
  # p = sigmoid(logit): class 0 is a negative at p = 1/2, class 1 a positive at p = 3/4.
  logits = np.array([[[[0.0, math.log(3.0)]]]], np.float32)
  boxes = np.full((1, 1, 1, 4), 0.5, np.float32)
  batch = {
    "boxes": np.full((1, 1, 4), 0.5, np.float32),
    "labels": np.array([[1]], np.int32),
    "box_valid": np.array([[True]]),
  }
  negative = 0.75 * 0.5**2 * math.log(2.0)  # (1 - alpha) p^2 (-log(1 - p))
  positive = 0.25 * 0.25**2 * -math.log(0.75)  # alpha (1 - p)^2 (-log p)
  np.testing.assert_allclose(
    losses.sigmoid_focal_loss(jnp.asarray(logits[0, 0, 0]), jnp.array([0.0, 1.0])),
    [negative, positive],
    rtol=1e-6,
  )
  config = _config(aux_loss=False)
  ours = _criterion(config)(_out(logits, boxes, aux_loss=False), batch)
  np.testing.assert_allclose(ours["loss_ce"], negative + positive, rtol=1e-6)
  np.testing.assert_allclose(ours["loss_bbox"], 0.0, atol=1e-7)
  np.testing.assert_allclose(ours["loss_giou"], 0.0, atol=1e-7)
  assert "loss_ce_0" not in ours


@pytest.mark.parametrize("no_boxes", [False, True])
def test_gradients_are_finite_with_degenerate_boxes(no_boxes):
  logits, boxes, batch = _example(seed=2)
  boxes[:, 0, :3, 2] = 0.0  # zero-width predictions
  boxes[:, 2, :3, 3] = 0.0  # zero-height predictions
  boxes[:, 3, 0] = 0.0  # an all-zero prediction
  batch["boxes"][0, 0, 2:] = 0.0  # a valid but degenerate target
  batch["boxes"][~batch["box_valid"]] = np.nan  # garbage in padding slots
  if no_boxes:
    batch["box_valid"][:] = False
  criterion = _criterion(_config())

  def loss(logits, boxes):
    return criterion(_out(logits, boxes), batch)["loss"]

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(logits, boxes)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in grads)
  assert any(np.abs(g).sum() > 0 for g in grads)


@pytest.mark.parametrize("no_boxes", [False, True])
def test_data_axis_path_agrees_with_global_batch(no_boxes):
  logits, boxes, batch = _example(seed=3)
  if no_boxes:
    batch["box_valid"][:] = False
  config = _config()
  devices = 2

  def split(x, axis):  # The batch axis becomes (devices, B / devices).
    return jnp.stack(jnp.split(x, devices, axis=axis))

  def per_device(logits, boxes, batch):
    out = losses.set_criterion(_out(logits, boxes), batch, config, axis_name="data")
    return {k: v for k, v in out.items() if k.startswith("loss")}

  def sharded(logits, boxes):
    out = jax.vmap(per_device, axis_name="data")(
      split(logits, 1), split(boxes, 1), {k: split(v, 0) for k, v in batch.items()}
    )
    return jax.tree.map(jnp.mean, out)  # lax.pmean over the axis in a real pmap

  def plain(logits, boxes):
    out = losses.set_criterion(_out(logits, boxes), batch, config)
    return {k: v for k, v in out.items() if k.startswith("loss")}

  def with_grads(fn):
    return jax.jit(
      jax.value_and_grad(
        lambda lg, bx: (fn(lg, bx)["loss"], fn(lg, bx)), argnums=(0, 1), has_aux=True
      )
    )

  (_, ours), grads = with_grads(sharded)(logits, boxes)
  (_, reference), grads_ref = with_grads(plain)(logits, boxes)
  assert ours.keys() == reference.keys()
  for name in reference:
    np.testing.assert_allclose(ours[name], reference[name], rtol=1e-5, err_msg=name)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-7)
