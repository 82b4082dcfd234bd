"""Checkpoints: a round trip of the whole train state, split and replicated layouts, and a SIGKILL
in the middle of a write."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conddetr_jax.training import checkpoint, optimizer
from conddetr_jax.training import state as state_lib
from configs import default
from tests import processes

# Writes step 1 completely, starts writing step 2, and dies at once (as `kill -9` would).
KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, os.path.join({repo!r}, "tests"))
from test_training_checkpoint import make_state
from conddetr_jax.training import checkpoint

ckpt = checkpoint.Checkpointer(sys.argv[1], keep=3)
ckpt.save(1, make_state(1), {{"step": 1}})
ckpt.wait()
ckpt.save(2, make_state(2), {{"step": 2}})
os.kill(os.getpid(), signal.SIGKILL)
"""


# On 4 devices: a state written split over them (the jit strategy's default) restores replicated
# (as evaluation and runs with config.shard_state=False read it) and the other way round (a run
# resumed from a checkpoint written before the state was split). Prints the leaves that differ
# from what was saved and the split leaves of each restored state.
RELAYOUT = """
import os, sys
sys.path.insert(0, os.path.join({repo!r}, "tests"))
import jax
import numpy as np
from test_training_checkpoint import make_state
from conddetr_jax import sharding
from conddetr_jax.training import checkpoint, parallel

assert jax.device_count() == 4
mesh = sharding.make_mesh()
state = make_state(5, size=4096, keep_ema=True)
layouts = {{split: parallel.train_state_sharding(state, mesh, shard=split) for split in (1, 0)}}
for written, read in ((1, 0), (0, 1)):
  ckpt = checkpoint.Checkpointer(os.path.join(sys.argv[1], str(written)), keep=1)
  ckpt.save(1, jax.device_put(state, layouts[written]), {{"step": 1}})
  ckpt.wait()
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        state, layouts[read])
  restored, _ = ckpt.restore(1, target)
  ckpt.close()
  saved = jax.tree_util.tree_leaves_with_path(state)
  differ = [jax.tree_util.keystr(k) for (k, a), b in zip(saved, jax.device_get(
      jax.tree.leaves(restored))) if not np.array_equal(a, b)]
  split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored))
  print(f"written_split={{written}} read_split={{read}} differ={{differ}} split_leaves={{split}}")
"""


def test_a_split_checkpoint_restores_replicated_and_a_replicated_one_split(tmp_path):
  env = processes.cpu_env(
    PYTHONPATH=processes.REPO, XLA_FLAGS="--xla_force_host_platform_device_count=4"
  )
  script = RELAYOUT.format(repo=processes.REPO)
  out = processes.run_python_ok("-c", script, str(tmp_path), env=env, timeout=600).stdout
  # The weights, both AdamW moments and the average: 4 split leaves of 4096 values.
  assert "written_split=1 read_split=0 differ=[] split_leaves=0" in out, out
  assert "written_split=0 read_split=1 differ=[] split_leaves=4" in out, out


def make_state(seed: int, size: int = 1 << 24, keep_ema: bool = False) -> state_lib.TrainState:
  """A train state with one large tensor (64 MiB, x3 with AdamW's moments) so writing it takes a
  while; with ``keep_ema``, its moving average is the tensor halved."""
  config = default.get_config()
  params = {
    "class_embed": {"kernel": np.random.default_rng(seed).normal(size=(size,)).astype(np.float32)}
  }
  tx = optimizer.build_optimizer(config, params, optimizer.learning_rate_schedule(config, 10))
  state = state_lib.create_train_state(
    {"params": params}, tx, state_lib.dropout_key_data(config), keep_ema
  )
  if keep_ema:
    state = state.replace(ema_params=jax.tree.map(lambda p: p / 2, params))
  return state.replace(step=np.int32(seed))


def _target(state: state_lib.TrainState):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state
  )


def test_round_trip_restores_every_leaf_and_the_meta_record(tmp_path):
  state = make_state(3, size=1000)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state, {"step": 7, "global_batch_size": 4})
  ckpt.wait()
  restored, meta = ckpt.restore(ckpt.latest_step(), _target(state))
  ckpt.close()
  assert meta == {"step": 7, "global_batch_size": 4, "ema": False}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_usable(tmp_path):
  directory = tmp_path / "checkpoints"
  result = processes.run_python(
    "-c",
    KILLED_WRITER.format(repo=processes.REPO),
    str(directory),
    env=processes.cpu_env(PYTHONPATH=processes.REPO),
  )
  assert result.returncode == -9, result.stderr[-3000:]
  assert any("tmp" in name for name in os.listdir(directory)), os.listdir(
    directory
  )  # killed mid-write

  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  assert ckpt.latest_step() == 1
  expected = make_state(1)
  restored, meta = ckpt.restore(1, _target(expected))
  assert meta == {"step": 1, "ema": False}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(expected))
  ckpt.save(2, make_state(2, size=1000), {"step": 2})  # and the directory takes new checkpoints
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]  # the unfinished write was cleaned up


def test_a_weight_average_round_trips_and_cannot_be_switched_on_or_off_at_a_resume(tmp_path):
  with_ema, without = make_state(3, size=1000, keep_ema=True), make_state(4, size=1000)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2, asynchronous=False)
  try:
    ckpt.save(3, with_ema, {"step": 3})
    ckpt.save(4, without, {"step": 4})
    restored, meta = ckpt.restore(3, _target(with_ema))
    assert meta == {"step": 3, "ema": True}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(with_ema))
    with pytest.raises(
      ValueError,
      match=r"checkpoint 3 in .* was written with a moving average of the weights, "
      r"and this run keeps none: resume with config.ema_decay > 0",
    ):
      ckpt.restore(3, _target(without))
    with pytest.raises(
      ValueError,
      match=r"checkpoint 4 in .* was written without a moving average of the "
      r"weights, and this run keeps one: resume with config.ema_decay=0, or "
      r"start in a new --workdir \(--config.init_from=.*\)",
    ):
      ckpt.restore(4, _target(with_ema))
  finally:
    ckpt.close()


def test_a_checkpoint_written_before_weight_averages_existed_still_resumes(tmp_path):
  # The layout of those checkpoints: the state's fields without ema_params, and no "ema" in meta.
  state = make_state(5, size=1000)
  fields = {name: value for name, value in vars(state).items() if name != "ema_params"}
  with ocp.CheckpointManager(tmp_path, item_names=("state", "meta")) as manager:
    manager.save(
      5,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(fields),
        meta=ocp.args.JsonSave({"step": 5, "global_batch_size": 4}),
      ),
    )
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  restored, meta = ckpt.restore(5, _target(state))
  with pytest.raises(ValueError, match="written without a moving average of the weights"):
    ckpt.restore(5, _target(make_state(5, size=1000, keep_ema=True)))
  ckpt.close()
  assert meta == {"step": 5, "global_batch_size": 4} and restored.ema_params is None
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
