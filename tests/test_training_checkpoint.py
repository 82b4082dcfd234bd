"""Checkpoints: a round trip of the whole train state, and a SIGKILL in the middle of a write."""

import os
import subprocess
import sys

import jax
import numpy as np

from configs import default
from conddetr_jax.training import checkpoint, optimizer
from conddetr_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def make_state(seed: int, size: int = 1 << 24) -> state_lib.TrainState:
  """A train state with one large tensor (64 MiB, x3 with AdamW's moments) so writing it takes a while."""
  config = default.get_config()
  params = {"class_embed": {"kernel": np.random.default_rng(seed).normal(size=(size,)).astype(np.float32)}}
  tx = optimizer.build_optimizer(config, params, optimizer.learning_rate_schedule(config, 10))
  state = state_lib.create_train_state({"params": params}, tx, state_lib.dropout_key_data(config))
  return state.replace(step=np.int32(seed))


def _target(state: state_lib.TrainState):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), state)


def test_round_trip_restores_every_leaf_and_the_meta_record(tmp_path):
  state = make_state(3, size=1000)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state, {"step": 7, "global_batch_size": 4})
  ckpt.wait()
  restored, meta = ckpt.restore(ckpt.latest_step(), _target(state))
  ckpt.close()
  assert meta == {"step": 7, "global_batch_size": 4}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_usable(tmp_path):
  directory = tmp_path / "checkpoints"
  result = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=REPO), str(directory)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == -9, result.stderr[-3000:]
  assert any("tmp" in name for name in os.listdir(directory)), os.listdir(directory)  # killed mid-write

  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  assert ckpt.latest_step() == 1
  expected = make_state(1)
  restored, meta = ckpt.restore(1, _target(expected))
  assert meta == {"step": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(expected))
  ckpt.save(2, make_state(2, size=1000), {"step": 2})  # and the directory takes new checkpoints
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]  # the unfinished write was cleaned up
