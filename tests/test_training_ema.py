"""The moving average of the weights (config.ema_decay > 0): its update, skipped updates, the
variables evaluated, and eval reading it from a checkpoint (checkpoints themselves:
test_training_checkpoint.py)."""

import jax
import numpy as np
import pytest

from conddetr_jax import sharding
from conddetr_jax.checkpoints import weights
from conddetr_jax.training import checkpoint, ema, loop
from conddetr_jax.training import state as state_lib
from configs import test_tiny
from tests.test_training_step import _batch, _Run

DECAY = 0.9


def test_decay_warms_up_from_a_tenth_then_holds_at_the_configured_value():
  assert float(ema.decay_at(0, 0.99)) == pytest.approx(0.1)
  assert float(ema.decay_at(8, 0.99)) == pytest.approx(0.5)
  assert float(ema.decay_at(10_000, 0.99)) == pytest.approx(0.99)
  assert float(ema.decay_at(10_000, 0.5)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def run():
  """A tiny run keeping an average with decay 0.9, after two good steps and one non-finite one."""
  run = _Run(ema_decay=DECAY)
  run.states = [jax.device_get(run.state)]
  for seed in (0, 1):
    assert run.step(_batch(seed))["finite"]
    run.states.append(jax.device_get(run.state))
  bad = _batch(2)
  bad["image"][0, 0, 0, 0] = np.nan
  assert not run.step(bad)["finite"]
  run.states.append(jax.device_get(run.state))
  return run


def test_the_average_starts_at_the_weights_and_follows_each_update(run):
  s0, s1, s2, _ = run.states
  jax.tree.map(np.testing.assert_array_equal, s0.ema_params, s0.params)
  expected = jax.tree.map(
    lambda e, p: 0.1 * e + 0.9 * p, s0.ema_params, s1.params
  )  # decay 1/10 at update 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s1.ema_params, expected
  )
  d = 2.0 / 11.0  # update 1
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, s1.ema_params, s2.params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s2.ema_params, expected
  )
  moved = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), s2.ema_params["decoder"], s2.params["decoder"]
  )
  assert all(jax.tree.leaves(moved))  # an average, not a copy


def test_a_skipped_update_leaves_the_average_untouched(run):
  _, _, s2, s3 = run.states
  jax.tree.map(np.testing.assert_array_equal, s3.ema_params, s2.ema_params)


def test_evaluated_variables_are_the_average_unless_use_ema_is_off(run):
  s = run.states[2]
  assert state_lib.evaluated_variables(s, use_ema=True)["params"] is s.ema_params
  assert state_lib.evaluated_variables(s, use_ema=False)["params"] is s.params


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
  """``run``'s state after two steps, checkpointed as train.py does."""
  workdir = tmp_path_factory.mktemp("ema_run")
  ckpt = checkpoint.Checkpointer(str(workdir / weights.CHECKPOINT_DIR), keep=1, asynchronous=False)
  ckpt.save(2, run.states[2], {"step": 2, "global_batch_size": 2})
  ckpt.close()
  return workdir


def test_eval_reads_the_average_from_a_training_checkpoint_and_the_raw_weights_on_request(
  run, saved
):
  config = run.config.copy_and_resolve_references()
  variables, step = weights.load_variables(config, str(saved))
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, variables["params"], run.states[2].ema_params)
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], run.states[2].batch_stats)
  config.evaluation.use_ema = False
  variables, _ = weights.load_variables(config, str(saved))
  jax.tree.map(np.testing.assert_array_equal, variables["params"], run.states[2].params)


def test_ema_decay_outside_zero_to_one_is_refused():
  config = test_tiny.get_config()
  config.ema_decay = 1.0
  with pytest.raises(ValueError, match=r"config.ema_decay=1.0: must be in \[0, 1\)"):
    loop.validate_config(config, device_count=1)


def test_train_py_keeps_an_average_of_every_trainable_tensor_only_when_ema_decay_is_set():
  config = test_tiny.get_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  for decay in (0.0, 0.999):
    config.ema_decay = decay
    _, abstract_variables, create, _ = loop.build_train_step(config, steps_per_epoch=10, mesh=mesh)
    state = jax.eval_shape(create, abstract_variables)
    if decay:
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state.ema_params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state.params
      )
    else:
      assert state.ema_params is None
