"""Gradient accumulation: K micro-batches make the update of one K-times-larger batch.

The whole batch's loss divides by its box count; the micro-batches here hold different numbers
of boxes (one holds none), so only a box-count-weighted combination of their gradients equals
the whole batch's, which the tests check against a plain mean as well.
"""

import jax
import numpy as np
import pytest

from conddetr_jax import models, sharding
from conddetr_jax.training import batch as batch_lib
from conddetr_jax.training import loop, optimizer, parallel
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib
from configs import test_tiny

BOXES_PER_IMAGE = (
  0,
  1,
  3,
  2,
  0,
  2,
  4,
  1,
)  # strided micro-batches (rows k, k+K, ...): K=4 -> 0, 3, 7, 3 boxes


def _batch(seed: int) -> dict[str, np.ndarray]:
  """8 random 64x64 images in the data pipeline's format, with BOXES_PER_IMAGE valid boxes."""
  rng = np.random.default_rng(seed)
  n, max_boxes = len(BOXES_PER_IMAGE), 8
  pad_mask = np.zeros((n, 64, 64), bool)
  pad_mask[::2, :, 40:] = True
  boxes = np.concatenate(
    [rng.uniform(0.3, 0.7, (n, max_boxes, 2)), rng.uniform(0.1, 0.3, (n, max_boxes, 2))], -1
  )
  return {
    "image": rng.normal(size=(n, 64, 64, 3)).astype(np.float32),
    "pad_mask": pad_mask,
    "boxes": boxes.astype(np.float32),
    "labels": rng.integers(1, 10, (n, max_boxes)).astype(np.int32),
    "box_valid": np.arange(max_boxes)[None] < np.asarray(BOXES_PER_IMAGE)[:, None],
  }


def _config(accum_steps: int = 1):
  config = test_tiny.get_config()
  config.model.dropout = 0.0  # dropout masks depend on the micro-batch shapes; nothing else may
  config.grad_accum_steps = accum_steps
  return config


@pytest.fixture(scope="module")
def gradients():
  """gradients(batch, K) -> (grads, metrics) of the tiny model at its initial params (no
  dropout)."""
  config = _config()
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  loss_fn = step_lib.set_loss_fn(model, variables["batch_stats"], config)
  jitted = {
    k: jax.jit(lambda p, b, k=k: step_lib.gradients(p, b, loss_fn, jax.random.PRNGKey(1), k))
    for k in (1, 4)
  }
  return lambda batch, accum_steps: jax.device_get(jitted[accum_steps](variables["params"], batch))


def _assert_gradients_close(actual, expected) -> None:
  """To float32 rounding: 1e-5 of each leaf's largest magnitude, plus 1e-7 of the whole tree's
  (some tensors' true gradient is zero, e.g. key biases, which softmax ignores: only noise)."""
  scale = max(float(np.abs(e).max()) for e in jax.tree.leaves(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * float(np.abs(e).max()) + 1e-7 * scale)


def test_accumulated_gradient_and_losses_equal_the_whole_batch(gradients):
  batch = _batch(0)
  whole_grads, whole_terms = gradients(batch, 1)
  grads, terms = gradients(batch, 4)  # micro-batches of 0, 3, 7 and 3 boxes

  _assert_gradients_close(grads, whole_grads)
  for name in whole_terms:
    if name.startswith("loss"):
      np.testing.assert_allclose(terms[name], whole_terms[name], rtol=1e-5, err_msg=name)


def test_a_plain_mean_of_micro_batch_gradients_is_not_the_whole_batch_gradient(gradients):
  # What the box-count weighting is for (and what optax.MultiSteps' plain mean would give).
  batch = _batch(0)
  whole_grads, _ = gradients(batch, 1)
  micro = [gradients({k: v[i::4] for k, v in batch.items()}, 1)[0] for i in range(4)]
  plain_mean = jax.tree.map(lambda *g: np.mean(g, axis=0), *micro)
  with pytest.raises(AssertionError):
    _assert_gradients_close(plain_mean, whole_grads)


def _train(config, batches):
  """The state and per-step metrics after one jitted train_step per batch, from the same init."""
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  tx = optimizer.build_optimizer(
    config, variables["params"], optimizer.learning_rate_schedule(config, 100)
  )
  par = parallel.JitParallel(
    lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, config=config),
    sharding.make_mesh(jax.devices()[:1]),
  )
  state = par.device_state(
    state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config))
  )
  initial = jax.device_get(state)
  history = []
  for batch in batches:
    state, metrics = par.step(state, jax.device_put(batch, par.batch_sharding))
    history.append(jax.device_get(metrics))
  return initial, jax.device_get(state), history


@pytest.mark.slow  # two train-step programs: about a minute of CPU
def test_accumulated_train_steps_clip_and_apply_the_whole_batch_update():
  batches = [_batch(0), _batch(1)]
  initial, whole_state, whole_history = _train(_config(1), batches)
  _, state, history = _train(_config(4), batches)
  lr = _config().optimizer.lr

  assert int(state.step) == int(whole_state.step) == 2  # a step is one optimiser update
  for metrics, whole in zip(history, whole_history):
    # Clipping is active (norm > 0.1) and sees the accumulated gradient, as with the whole batch.
    assert whole["grad_norm"] > _config().optimizer.clip_grad_norm
    np.testing.assert_allclose(metrics["grad_norm"], whole["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["lr"], whole["lr"])
  # Two AdamW updates, each moving a parameter by about lr; they agree to within 5% of it. Not
  # closer: AdamW scales each element's step to about lr whatever its gradient's size, so an element
  # whose gradient nearly cancels carries its float32 rounding (which differs with the summation
  # order: micro-batches, the 1x1 convs' matrix products) into its step at lr scale, up to ~1%
  # measured. The gradients themselves are compared closely, against a plain-mean control, in the
  # tests above.
  moved = max(
    float(np.abs(b - a).max())
    for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(whole_state.params))
  )
  assert moved > lr
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(whole_state.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-2 * lr)


@pytest.mark.parametrize(
  "overrides, devices, message",
  [
    (
      dict(global_batch_size=8, grad_accum_steps=3),
      1,
      r"config.global_batch_size=8 is not divisible by the number of devices \(1\) x "
      r"config.grad_accum_steps \(3\)",
    ),
    (
      dict(global_batch_size=16, grad_accum_steps=2),
      3,
      r"config.global_batch_size=16 is not divisible by the number of devices \(3\) x "
      r"config.grad_accum_steps \(2\)",
    ),
    (dict(grad_accum_steps=-1), 1, r"config.grad_accum_steps=-1: must be >= 1, or 0 to derive it"),
  ],
)
def test_a_batch_that_does_not_split_into_micro_batches_over_the_devices_is_an_error(
  overrides, devices, message
):
  config = test_tiny.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    loop.validate_config(config, device_count=devices)


def test_global_batch_counts_devices_and_micro_batches():
  config = test_tiny.get_config()
  config.update(per_device_batch_size=2, grad_accum_steps=8)
  assert (
    batch_lib.plan_batch(config, device_count=1).global_batch == 16
  )  # the original's 2 x 8 GPUs, on one
  config.update(global_batch_size=16, grad_accum_steps=3)
  with pytest.raises(ValueError):
    batch_lib.plan_batch(config, device_count=1)
  config.update(grad_accum_steps=4)
  assert (
    batch_lib.plan_batch(config, device_count=2).global_batch == 16
  )  # 2 per device x 2 devices x 4
