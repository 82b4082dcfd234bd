"""The DETR baseline decoder of the convergence study trains, and the study's script parts work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import convergence
from conddetr_jax import models
from conddetr_jax.criterion import losses
from tests.test_model import tiny_config

# 40 steps of one program: its run time, not its compile time, is the test's (tests/conftest.py
# compiles the suite's many programs at LLVM level 0, which runs them slower).
EXECUTION_SPEED = {"xla_backend_optimization_level": 2}


def _batch():
  """Two 64x96 images with one bright rectangle each, and their boxes (cxcywh, normalised)."""
  images = np.zeros((2, 64, 96, 3), np.float32)
  images[0, 8:40, 10:50] = 2.0
  images[1, 30:60, 40:90] = 2.0
  boxes = np.zeros((2, 4, 4), np.float32)
  boxes[0, 0] = [30 / 96, 24 / 64, 40 / 96, 32 / 64]
  boxes[1, 0] = [65 / 96, 45 / 64, 50 / 96, 30 / 64]
  labels = np.zeros((2, 4), np.int32)
  labels[:, 0] = [1, 3]
  valid = np.zeros((2, 4), bool)
  valid[:, 0] = True
  return dict(
    image=jnp.asarray(images),
    pad_mask=jnp.zeros((2, 64, 96), bool),
    boxes=jnp.asarray(boxes),
    labels=jnp.asarray(labels),
    box_valid=jnp.asarray(valid),
  )


@pytest.mark.parametrize("decoder", ["detr", "conditional"])
def test_both_decoders_reduce_the_set_loss_on_a_fixed_batch(decoder):
  config = tiny_config(decoder=decoder)
  model = models.build_model(config)
  batch = _batch()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch["image"], batch["pad_mask"])
  tx = optax.adam(1e-3)
  params = variables["params"]
  opt_state = tx.init(params)

  @functools.partial(jax.jit, compiler_options=EXECUTION_SPEED)
  def step(params, opt_state):
    def loss_fn(p):
      out = model.apply({**variables, "params": p}, batch["image"], batch["pad_mask"])
      return losses.set_criterion(out, batch, config)["loss"]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  history = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    history.append(float(loss))
  assert np.all(np.isfinite(history))
  assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5])


def test_steps_to_reach_and_the_config_differ_only_in_the_decoder():
  steps = np.array([100, 200, 300])
  assert convergence.steps_to_reach(steps, np.array([0.1, 0.3, 0.5]), 0.3) == 200
  assert convergence.steps_to_reach(steps, np.array([0.1, 0.2, 0.25]), 0.3) is None
  conditional = convergence.run_config(
    "conditional", 1, 300, 100, ["model.num_queries=12"]
  ).to_dict()
  detr = convergence.run_config("detr", 1, 300, 100, ["model.num_queries=12"]).to_dict()
  assert (
    conditional["model"].pop("decoder") == "conditional" and detr["model"].pop("decoder") == "detr"
  )
  assert conditional == detr
  assert conditional["model"]["num_queries"] == 12 and conditional["eval_every_steps"] == 100
  assert conditional["model"]["num_groups"] == 1  # whatever the demo's: the study sets it
  study_model = {
    key: conditional["model"][key]
    for key in (
      "backbone_num_stages",
      "dilation",
      "backbone_norm",
      "enc_layers",
      "dim_feedforward",
      "dense_head",
    )
  }
  assert study_model == dict(
    backbone_num_stages=4,
    dilation=False,
    backbone_norm="group_norm",
    enc_layers=2,
    dim_feedforward=1024,
    dense_head=False,
  )  # likewise: the recipe the study measured
  assert conditional["dataset"]["eval_size"] == 128
  assert convergence.run_config("conditional", 1, 300, 100, []).model.num_queries == 50
  grouped = convergence.run_config("conditional", 1, 300, 100, [], num_groups=5)
  assert grouped.model.num_groups == 5 and convergence.variant_name("detr", 5) == "detr_groups5"


def test_a_run_counts_as_finished_once_evaluated_at_the_last_step(tmp_path):
  assert not convergence.run_finished(str(tmp_path / "absent"), 300)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(
      '{"step": 100, "loss": 9.0}\n{"step": 200, "AP": 0.1, "AP50": 0.3}\n{"step": 300, "loss": '
      "8.0}\n"
    )
  assert not convergence.run_finished(str(tmp_path), 300)  # trained to 300, not yet evaluated there
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 300, "AP": 0.2, "AP50": 0.4}\n')
  assert convergence.run_finished(str(tmp_path), 300)
  assert convergence.read_ap_curve(str(tmp_path)) == [(200, 0.1, 0.3), (300, 0.2, 0.4)]


def test_the_baseline_is_the_detr_decoder_else_the_first_group_count():
  both = [("conditional", 1), ("detr", 1), ("conditional", 5), ("detr", 5)]
  assert convergence.baseline_variant(both) == "detr"
  assert convergence.baseline_variant([("conditional", 1), ("conditional", 5)]) == "conditional"
  assert convergence.baseline_variant([("conditional", 5), ("detr", 5)]) == "detr_groups5"
