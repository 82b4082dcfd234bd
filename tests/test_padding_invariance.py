"""Batch invariance: with the backbone's padding masking, an image's outputs ignore its batch.

An image padded into a larger canvas next to another image must give the logits and boxes it
gets alone and unpadded (the original's one-image-per-GPU forward), and a masked training step on
a padded batch must equal the one-image unpadded steps combined. The independent PyTorch
reference (HF's Conditional DETR) checks the unpadded forward itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.checkpoints import convert
from conddetr_jax.configs import default, test_tiny
from conddetr_jax.training import step
from tests import hf_reference

OUTPUT_ATOL = 1e-4  # float32; the two forwards differ only in summation order
# The reference's sharp random weights amplify that rounding: measured 1.2e-4 (R50) and 1.9e-4
# (DC5) on logits of magnitude ~10, where this project's own initialisation gives 2.4e-6 and
# 2.9e-6; without masking the padding moves them by ~1.
SHARP_WEIGHTS_OUTPUT_ATOL = 5e-4
GRAD_RTOL = 1e-5  # of each gradient tensor's largest magnitude
# Of the model's largest gradient magnitude: tensors whose gradient is zero in exact arithmetic (a
# key projection's bias shifts every logit of a query alike) hold only rounding noise (~1e-9).
GRAD_NOISE = 1e-6
# The end-to-end bounds of tests/test_parity.py: two float32 ResNets differ by rounding, which the
# reference's sharp random weights amplify.
REFERENCE_LOGITS_ATOL = 2e-2
REFERENCE_BOXES_ATOL = 2e-3
ALONE = (70, 101)  # the image under test: not a multiple of 32 in either side
NEIGHBOUR = (96, 90)
# Padded cells at every stride in both axes, and no multiple of any stride: nearest resizing of the
# pad mask (the original's) would call a padded row of the tiny model's stride-8 map valid.
CANVAS = (124, 150)


def tiny_config(**model):
  config = test_tiny.get_config()
  config.model.update(dropout=0.0, **model)
  return config


def r50_config(dilation):
  config = default.get_config()
  config.model.update(dilation=dilation, dropout=0.0)
  return config


@functools.lru_cache(maxsize=None)
def reference(dilation):
  return hf_reference.build_reference("resnet50", dilation=dilation, seed=3)


def images_alone_and_padded(seed=0):
  """The image alone (1, h, w, 3) unpadded, and a (2, H, W, 3) batch holding it padded, first."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=ALONE + (3,)).astype(np.float32)
  neighbour = rng.normal(size=NEIGHBOUR + (3,)).astype(np.float32)
  batch = np.zeros((2,) + CANVAS + (3,), np.float32)
  pad_mask = np.ones((2,) + CANVAS, bool)
  for i, pixels in enumerate([image, neighbour]):
    h, w = pixels.shape[:2]
    # Padding holds noise, not zeros: the masking, not the pipeline's zero fill, must hide it.
    batch[i] = rng.normal(size=CANVAS + (3,))
    batch[i, :h, :w] = pixels
    pad_mask[i, :h, :w] = False
  return image[None], np.zeros((1,) + ALONE, bool), batch, pad_mask


def inference(config):
  """The model's evaluation forward, compiled once per input shape for any weights:
  (variables, images, pad_mask) -> (logits, boxes)."""
  apply = jax.jit(functools.partial(models.build_model(config).apply, train=False))

  def run(variables, images, pad_mask):
    out = apply(variables, jnp.asarray(images), jnp.asarray(pad_mask))
    return np.asarray(out["pred_logits"]), np.asarray(out["pred_boxes"])

  return run


def assert_padded_equals_alone(forward, variables, atol=OUTPUT_ATOL):
  image, no_padding, batch, pad_mask = images_alone_and_padded()
  logits, boxes = forward(variables, image, no_padding)
  padded_logits, padded_boxes = forward(variables, batch, pad_mask)
  np.testing.assert_allclose(padded_logits[0], logits[0], atol=atol, rtol=0, err_msg="logits")
  np.testing.assert_allclose(padded_boxes[0], boxes[0], atol=atol, rtol=0, err_msg="boxes")
  return logits, boxes


@pytest.mark.parametrize("norm", ["frozen_bn", "group_norm", "group_norm_ws"])
def test_tiny_model_padded_next_to_another_image_gives_its_unpadded_outputs(norm):
  config = tiny_config(backbone_norm=norm, freeze_stem_and_layer1=norm == "frozen_bn")
  variables = convert.init_variables(config, seed=1)
  if norm != "frozen_bn":
    # GroupNorm's residual-branch scales start at zero, which would hide the branches' statistics.
    variables = jax.tree.map(lambda x: x + 0.5 if x.ndim == 1 else x, variables)
  assert_padded_equals_alone(inference(config), variables)


@pytest.mark.parametrize("dilation", [False, True], ids=["r50", "r50_dc5"])
def test_r50_padded_next_to_another_image_gives_its_unpadded_outputs_and_the_reference(dilation):
  config = r50_config(dilation)
  forward = inference(config)
  # The 1e-4 with this project's initialisation; then the reference's weights, sharper.
  assert_padded_equals_alone(forward, convert.init_variables(config, seed=1))
  ref = reference(dilation)
  variables = convert.from_torch(hf_reference.original_state_dict(ref), config)
  logits, boxes = assert_padded_equals_alone(forward, variables, SHARP_WEIGHTS_OUTPUT_ATOL)
  image, no_padding, _, _ = images_alone_and_padded()
  expected = hf_reference.run_reference(ref, image, no_padding)
  np.testing.assert_allclose(logits, expected["pred_logits"], atol=REFERENCE_LOGITS_ATOL, rtol=0)
  np.testing.assert_allclose(boxes, expected["pred_boxes"], atol=REFERENCE_BOXES_ATOL, rtol=0)


def test_without_masking_padding_moves_the_outputs():
  """The premise: the original's padded forward (mask_padding='never') depends on the padding."""
  config = tiny_config(mask_padding="never")
  variables = convert.init_variables(config, seed=1)
  image, no_padding, batch, pad_mask = images_alone_and_padded()
  forward = inference(config)
  logits, _ = forward(variables, image, no_padding)
  padded_logits, _ = forward(variables, batch, pad_mask)
  assert np.abs(padded_logits[0] - logits[0]).max() > 100 * OUTPUT_ATOL


def targets(boxes_per_image, max_boxes=8, seed=0):
  """``boxes``, ``labels``, ``box_valid`` for images holding the given numbers of boxes."""
  rng = np.random.default_rng(seed)
  count = len(boxes_per_image)
  boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (count, max_boxes, 1))
  labels = np.zeros((count, max_boxes), np.int32)
  valid = np.zeros((count, max_boxes), bool)
  for i, n in enumerate(boxes_per_image):
    boxes[i, :n, :2] = rng.uniform(0.3, 0.7, (n, 2))
    boxes[i, :n, 2:] = rng.uniform(0.1, 0.5, (n, 2))
    labels[i, :n] = rng.integers(0, 10, n)
    valid[i, :n] = True
  return {
    "boxes": jnp.asarray(boxes),
    "labels": jnp.asarray(labels),
    "box_valid": jnp.asarray(valid),
  }


def loss_and_grads(config, variables, images, pad_mask, labels):
  model = models.build_model(config)
  loss_fn = step.set_loss_fn(model, variables["batch_stats"], config)
  batch = {"image": jnp.asarray(images), "pad_mask": jnp.asarray(pad_mask), **labels}
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    variables["params"], batch, jax.random.PRNGKey(0)
  )
  return float(loss), grads


def test_masked_train_step_on_a_padded_batch_equals_the_unpadded_one_image_steps():
  # Stem and layer1 trained too, so their gradients (through the masked max-pool) are compared.
  config = tiny_config(mask_padding="always", freeze_stem_and_layer1=False)
  variables = convert.init_variables(config, seed=1)
  rng = np.random.default_rng(1)
  sizes, counts = [ALONE, NEIGHBOUR], [3, 2]
  batch = rng.normal(size=(2,) + CANVAS + (3,)).astype(np.float32)
  pad_mask = np.ones((2,) + CANVAS, bool)
  labels = targets(counts)
  combined_loss, combined_grads = 0.0, None
  for i, (h, w) in enumerate(sizes):
    pad_mask[i, :h, :w] = False
    one = jax.tree.map(lambda x: x[i : i + 1], labels)
    loss, grads = loss_and_grads(
      config, variables, batch[i : i + 1, :h, :w], np.zeros((1, h, w), bool), one
    )
    # Each one-image loss is normalised by its own box count, the batch's by the sum of them.
    share = counts[i] / sum(counts)
    combined_loss += share * loss
    grads = jax.tree.map(lambda g: share * g, grads)
    combined_grads = (
      grads if combined_grads is None else jax.tree.map(jnp.add, combined_grads, grads)
    )
  loss, grads = loss_and_grads(config, variables, batch, pad_mask, labels)
  np.testing.assert_allclose(loss, combined_loss, rtol=GRAD_RTOL)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  expected = dict(jax.tree_util.tree_leaves_with_path(combined_grads))
  noise = GRAD_NOISE * max(np.abs(np.asarray(e)).max() for e in expected.values())
  backbone_checked = 0
  for path, g in flat:
    e = np.asarray(expected[path])
    scale = np.abs(e).max()
    np.testing.assert_allclose(
      np.asarray(g), e, atol=GRAD_RTOL * scale + noise, rtol=0, err_msg=jax.tree_util.keystr(path)
    )
    backbone_checked += "backbone" in jax.tree_util.keystr(path) and scale > 0
  assert backbone_checked == 10, "every conv of the stem, layer1 and layer2 must be compared"
