"""config.model.refine_reference_points: each decoder layer's reference point is the box centre the
layer before predicted, with no gradient through it; off, every layer keeps the original's point."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test_tiny
from conddetr_jax import models
from tests.test_group_detr import _all_layers, _inputs


@functools.cache
def _model_and_variables(groups: int):
  """The refining model and its variables (the same tree as without refinement)."""
  config = test_tiny.get_config()
  config.model.update(dec_layers=3, dropout=0.0, refine_reference_points=True, num_groups=groups)
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  # The box head's last layer starts at zero (boxes = the reference at init); give it weights so
  # that each layer moves its boxes away from its reference.
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  last = params["bbox_embed"]["layers_2"]
  last["kernel"] = jax.random.normal(jax.random.PRNGKey(1), last["kernel"].shape) * 0.5
  last["bias"] = jax.random.normal(jax.random.PRNGKey(2), last["bias"].shape) * 0.5
  return model, {**variables, "params": params}


def _apply(model, variables, train: bool):
  images, pad_mask = _inputs()
  out, state = jax.jit(lambda v: model.apply(v, images, pad_mask, train=train, mutable=["intermediates"]))(variables)
  return out, np.asarray(state["intermediates"]["layer_reference_points"][0])


@pytest.mark.parametrize("groups,train", [(1, False), (2, True)])
def test_each_layers_reference_is_the_centre_the_layer_before_predicted(groups, train):
  model, variables = _model_and_variables(groups)
  out, references = _apply(model, variables, train)
  boxes = _all_layers(out, "pred_boxes")
  assert references.shape == boxes.shape[:-1] + (2,)
  np.testing.assert_allclose(references[1:], boxes[:-1, ..., :2], atol=1e-6, rtol=0)
  assert np.abs(references[1:] - references[:1]).max() > 1e-2  # the points did move

  # Without refinement, on the same parameters: every layer keeps the first layer's reference, and
  # the first layer (its reference and boxes) is the same model.
  original, original_references = _apply(model.clone(refine_reference_points=False), variables, train)
  original_boxes = _all_layers(original, "pred_boxes")
  np.testing.assert_array_equal(original_references, np.broadcast_to(references[:1], references.shape))
  np.testing.assert_array_equal(boxes[0], original_boxes[0])
  assert np.abs(boxes[1:] - original_boxes[1:]).max() > 1e-3


def test_no_gradient_flows_through_a_refined_reference():
  model, variables = _model_and_variables(1)
  images, pad_mask = _inputs()

  def reference_sums(params):
    _, state = model.apply({**variables, "params": params}, images, pad_mask, mutable=["intermediates"])
    references = state["intermediates"]["layer_reference_points"][0]
    return jnp.stack([references[0].sum(), references[1:].sum()])

  jacobian = jax.jit(jax.jacrev(reference_sums))(variables["params"])
  first = [g[0] for g in jax.tree_util.tree_leaves(jacobian)]
  later = [g[1] for g in jax.tree_util.tree_leaves(jacobian)]
  assert max(float(jnp.abs(g).max()) for g in later) == 0.0
  assert max(float(jnp.abs(g).max()) for g in first) > 0.0
