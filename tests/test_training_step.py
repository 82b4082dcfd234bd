"""The train step: what it updates, what it never touches, non-finite updates, bf16, compilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conddetr_jax import models, sharding
from conddetr_jax.training import optimizer, parallel
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib
from configs import test_tiny


def _batch(
  seed: int, batch: int = 2, hw: tuple[int, int] = (64, 64), max_boxes: int = 8
) -> dict[str, np.ndarray]:
  """A random padded batch in the data pipeline's format (3 boxes per image, the right third
  padded)."""
  rng = np.random.default_rng(seed)
  h, w = hw
  pad_mask = np.zeros((batch, h, w), bool)
  pad_mask[:, :, 2 * w // 3 :] = True
  centers = rng.uniform(0.3, 0.7, (batch, max_boxes, 2))
  sizes = rng.uniform(0.1, 0.3, (batch, max_boxes, 2))
  box_valid = np.zeros((batch, max_boxes), bool)
  box_valid[:, :3] = True
  return {
    "image": rng.normal(size=(batch, h, w, 3)).astype(np.float32),
    "pad_mask": pad_mask,
    "boxes": np.concatenate([centers, sizes], -1).astype(np.float32),
    "labels": rng.integers(1, 10, (batch, max_boxes)).astype(np.int32),
    "box_valid": box_valid,
  }


class _Run:
  """A tiny model's state and jitted step on one device, counting how often the step is traced."""

  def __init__(
    self, dtype: str = "float32", variables=None, ema_decay: float = 0.0, **model_overrides
  ):
    self.config = test_tiny.get_config()
    self.config.model.update(dtype=dtype, **model_overrides)
    self.config.ema_decay = ema_decay
    model = models.build_model(self.config)
    if variables is None:
      variables = models.init_variables(model, jax.random.PRNGKey(0))
    tx = optimizer.build_optimizer(
      self.config,
      variables["params"],
      optimizer.learning_rate_schedule(self.config, steps_per_epoch=100),
    )
    self.traces = 0

    def counted_step(state, batch):
      self.traces += 1
      return step_lib.train_step(state, batch, model=model, tx=tx, config=self.config)

    self.par = parallel.JitParallel(counted_step, sharding.make_mesh(jax.devices()[:1]))
    self.state = self.par.device_state(
      state_lib.create_train_state(
        variables, tx, state_lib.dropout_key_data(self.config), keep_ema=ema_decay > 0
      )
    )

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    self.state, metrics = self.par.step(self.state, jax.device_put(batch, self.par.batch_sharding))
    return jax.device_get(metrics)


@pytest.fixture(scope="module")
def run():
  """The float32 run after its first step, on ``_batch(0)``; keeps the states around that step."""
  run = _Run()
  run.initial = jax.device_get(run.state)
  run.first_metrics = run.step(_batch(0))
  run.after_first = jax.device_get(run.state)
  return run


def _leaves_by_label(params) -> dict[str, list[np.ndarray]]:
  out = {}
  for label, leaf in zip(jax.tree.leaves(models.param_labels(params)), jax.tree.leaves(params)):
    out.setdefault(label, []).append(np.asarray(leaf))
  return out


def test_step_trains_backbone_and_transformer_but_never_stem_layer1_or_batchnorm(run):
  before, metrics, after = run.initial, run.first_metrics, run.after_first

  assert int(after.step) == int(before.step) + 1
  assert np.isfinite(metrics["loss"]) and metrics["finite"]
  assert (
    before.ema_params is None and after.ema_params is None
  )  # config.ema_decay = 0: no average kept
  assert {
    "loss_ce",
    "loss_bbox",
    "loss_giou",
    "loss_ce_0",
    "class_error",
    "lr",
    "grad_norm",
  } <= set(metrics)
  np.testing.assert_allclose(metrics["lr"], 1e-4, rtol=1e-6)
  weighted = sum(
    w * metrics[k + s]
    for k, w in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2))
    for s in ("", "_0")
  )
  np.testing.assert_allclose(metrics["loss"], weighted, rtol=1e-5)
  old, new = _leaves_by_label(before.params), _leaves_by_label(after.params)
  for a, b in zip(old["frozen"], new["frozen"]):
    np.testing.assert_array_equal(a, b)
  assert all(not np.array_equal(a, b) for a, b in zip(old["backbone"], new["backbone"]))
  # A few transformer tensors get no gradient on the first step, as in the original: the box
  # head's zero-initialised last layer blocks it to the layers before, and the decoder's target
  # starts at zero (its first self-attention content projections); weight decay alone (1e-8
  # relative) is below float32 resolution.
  moved = [not np.array_equal(a, b) for a, b in zip(old["transformer"], new["transformer"])]
  assert np.mean(moved) > 0.8
  jax.tree.map(np.testing.assert_array_equal, before.batch_stats, after.batch_stats)


def test_step_donates_the_state(run):
  run.step(
    _batch(1)
  )  # a state no numpy view points to (on CPU, views pin buffers against donation)
  old = run.state
  run.step(_batch(1))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))


def test_nonfinite_loss_skips_the_update_and_records_the_first_such_step(run):
  bad = _batch(2)
  bad["image"][0, 0, 0, 0] = np.nan
  before = jax.device_get(run.state)
  metrics = run.step(bad)
  run.step(bad)
  after = jax.device_get(run.state)

  assert not metrics["finite"] and not np.isfinite(metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)
  assert int(after.step) == int(before.step) + 2
  assert int(after.nonfinite_count) == int(before.nonfinite_count) + 2
  assert int(after.first_nonfinite_step) == int(before.step) + 1
  assert run.step(_batch(3))["finite"]  # training goes on from the last good parameters


def test_step_compiles_once_per_bucket_shape(run):
  for seed in range(3):  # new batches of the bucket shape the fixture's step compiled
    run.step(_batch(10 + seed))
  assert run.traces == 1
  run.par.lower(run.state, jax.device_put(_batch(4, hw=(64, 96)), run.par.batch_sharding))
  assert run.traces == 2  # another bucket is another program


def test_bfloat16_compute_keeps_params_optimizer_state_and_loss_in_float32(run):
  bf16 = _Run("bfloat16", variables=run.initial.variables)
  metrics = bf16.step(_batch(0))
  state = jax.device_get(bf16.state)
  assert np.isfinite(metrics["loss"]) and metrics["loss"].dtype == np.float32
  dtypes = {
    leaf.dtype
    for leaf in jax.tree.leaves((state.params, state.opt_state))
    if leaf.dtype.kind == "f"
  }
  assert dtypes == {np.dtype(np.float32)}
  # Same initial variables and batch: the loss differs from float32's only by bf16 rounding.
  f32_loss = float(run.first_metrics["loss"])
  assert 1e-6 < abs(float(metrics["loss"]) - f32_loss) < 0.05 * f32_loss


def test_group_norm_model_trains_its_whole_backbone_and_has_no_batch_stats():
  # The demo's from-scratch backbone: GroupNorm, nothing frozen. The first step moves only the
  # zero-initialised norms ending each residual branch (nothing flows past them yet) and every
  # tensor outside those branches; after the second step every backbone tensor has moved.
  gn = _Run(backbone_norm="group_norm", freeze_stem_and_layer1=False)
  initial = jax.device_get(gn.state)
  assert initial.batch_stats == {}
  assert np.isfinite(gn.step(_batch(0))["loss"])
  gn.step(_batch(1))
  after = jax.device_get(gn.state)
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), initial.params["backbone"], after.params["backbone"]
  )
  assert all(jax.tree.leaves(moved)), moved
