"""Group DETR (config.model.num_groups): grouped decoding, per-group matching and losses, group 0 at
inference, and K-group training checkpoints."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.checkpoints import weights
from conddetr_jax.criterion import losses
from conddetr_jax.training import checkpoint
from configs import test_tiny
from tests import test_losses
from tests.test_training_step import _batch, _Run

GROUPS = 3


def _config(num_groups: int = GROUPS, **model_overrides) -> ml_collections.ConfigDict:
  config = test_tiny.get_config()
  config.model.update(num_groups=num_groups, dropout=0.0, **model_overrides)
  return config


def _inputs(batch: int = 2, size: int = 64) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(0)
  pad_mask = np.zeros((batch, size, size), bool)
  pad_mask[-1, :, size // 2 :] = True
  return jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32), jnp.asarray(pad_mask)


def _all_layers(out: dict, key: str) -> np.ndarray:
  """(L, B, Q, ...) of every decoder layer's ``key``, auxiliary layers first."""
  return np.stack([o[key] for o in out["aux_outputs"]] + [out[key]])


@pytest.mark.parametrize("decoder", ["conditional", "detr"])
def test_queries_attend_only_within_their_group_in_training(decoder):
  config = _config(decoder=decoder)
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  images, pad_mask = _inputs()
  q = config.model.num_queries
  apply = jax.jit(lambda v: model.apply(v, images, pad_mask, train=True))
  out = apply(variables)
  assert out["pred_logits"].shape == (2, GROUPS * q, config.model.num_classes)

  # group_query_embed holds groups 1..K-1; change the queries of group 2 (the last) only.
  params = dict(variables["params"])
  params["group_query_embed"] = params["group_query_embed"].at[q:].add(1.0)
  perturbed = apply({**variables, "params": params})
  for key in ("pred_logits", "pred_boxes"):
    before, after = _all_layers(out, key), _all_layers(perturbed, key)
    np.testing.assert_array_equal(after[:, :, : 2 * q], before[:, :, : 2 * q])  # groups 0 and 1
  # (At init the box head's last layer is zero, so DETR's boxes do not yet depend on the queries.)
  changed = np.abs(_all_layers(perturbed, "pred_logits") - _all_layers(out, "pred_logits"))[
    :, :, 2 * q :
  ]
  assert changed.max() > 1e-3


def test_inference_runs_group_0_alone_as_a_one_group_model_with_its_weights():
  # Masked in training too, so the training forward's group 0 can equal the inference forward.
  config = _config(mask_padding="always")
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  assert variables["params"]["group_query_embed"].shape == (
    (GROUPS - 1) * config.model.num_queries,
    config.model.hidden_dim,
  )
  one_group = models.build_model(_config(num_groups=1, mask_padding="always"))
  sliced = {
    **variables,
    "params": {k: v for k, v in variables["params"].items() if k != "group_query_embed"},
  }
  images, pad_mask = _inputs()

  out = model.apply(variables, images, pad_mask, train=False)
  expected = one_group.apply(sliced, images, pad_mask, train=False)
  assert out["pred_logits"].shape == (2, config.model.num_queries, config.model.num_classes)
  jax.tree.map(np.testing.assert_array_equal, out, expected)
  # And group 0 of the training forward (no dropout here) is that same model.
  train_out = model.apply(variables, images, pad_mask, train=True)
  q = config.model.num_queries
  for key in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(
      _all_layers(train_out, key)[:, :, :q], _all_layers(expected, key), atol=1e-5
    )


def test_one_group_adds_no_parameter_and_every_query_attends_to_every_other():
  """num_groups=1 (the default: configs/default.py declares the field, so every config has it) is
  the original's model: no extra embedding, one group of all queries."""
  config = _config(num_groups=1)
  shapes = jax.tree.map(
    lambda x: x.shape,
    models.init_variables(models.build_model(config), jax.random.PRNGKey(0), abstract=True),
  )
  assert "group_query_embed" not in shapes["params"]
  # The training forward pass: changing the last query changes the first.
  images, pad_mask = _inputs()
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(0))
  config.model.dropout = 0.1
  model = models.build_model(config)
  forward = jax.jit(
    lambda v: model.apply(v, images, pad_mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  )
  out = forward(variables)
  params = dict(variables["params"])
  params["query_embed"] = params["query_embed"].at[-1].add(1.0)
  perturbed = forward({**variables, "params": params})
  assert (
    np.abs(_all_layers(perturbed, "pred_logits") - _all_layers(out, "pred_logits"))[:, :, 0].max()
    > 1e-4
  )


def test_k_group_loss_is_the_sum_of_each_groups_one_group_loss():
  """Each group is matched on its own and normalised as one set. Group 1 is a copy of group 0: a
  matching over all groups together would give the copy's queries no target, halving its terms."""
  logits, boxes, batch = test_losses._example(seed=3)
  groups = [(logits, boxes), (logits, boxes)] + [test_losses._example(seed=s)[:2] for s in (4, 5)]
  grouped = _all_groups(groups)
  config = test_losses._config()
  config.model.num_groups = len(groups)
  total = losses.set_criterion(test_losses._out(*grouped), batch, config)

  config.model.num_groups = 1
  each = [losses.set_criterion(test_losses._out(lg, bx), batch, config) for lg, bx in groups]
  for name in total:
    if name.startswith(("loss", "cardinality_error")):
      combine = np.mean if name.startswith("cardinality_error") else np.sum
      np.testing.assert_allclose(
        total[name], combine([e[name] for e in each]), rtol=1e-5, err_msg=name
      )
  assert float(each[0]["loss_bbox"]) > 0


def _all_groups(groups: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """(L, B, Q, ...) per group -> (L, B, K*Q, ...), group k at [k*Q, (k+1)*Q) as the model lays them
  out."""
  return tuple(np.concatenate([g[i] for g in groups], axis=2) for i in range(2))


def test_criterion_refuses_outputs_that_are_not_k_groups():
  logits, boxes, batch = test_losses._example()
  config = test_losses._config()
  config.model.num_groups = 2  # the outputs hold one group: e.g. a train=False forward
  with pytest.raises(ValueError, match="num_groups=2"):
    losses.set_criterion(test_losses._out(logits, boxes), batch, config)


def test_bad_num_groups_names_the_field():
  with pytest.raises(ValueError, match=r"config\.model\.num_groups"):
    models.build_model(_config(num_groups=0))


def test_k_group_training_updates_every_group_and_its_checkpoint_restores_for_inference(tmp_path):
  run = _Run(num_groups=2)
  before = jax.device_get({k: run.state.params[k] for k in ("query_embed", "group_query_embed")})
  metrics = run.step(_batch(0))
  assert np.isfinite(metrics["loss"]) and metrics["finite"]
  state = jax.device_get(run.state)
  for name, value in before.items():
    assert np.abs(state.params[name] - value).max() > 0, name

  # A training checkpoint keeps every group (resume is exact); eval/predict restore it whole and run
  # group 0.
  checkpointer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1, asynchronous=False)
  checkpointer.save(1, state, {"step": 1})
  checkpointer.close()
  restored, step = weights.load_variables(run.config, str(tmp_path))
  assert step == 1
  jax.tree.map(np.testing.assert_array_equal, restored["params"], state.params)
  images, pad_mask = _inputs()
  out = models.build_model(run.config).apply(restored, images, pad_mask, train=False)
  assert out["pred_logits"].shape == (2, run.config.model.num_queries, run.config.model.num_classes)
