"""Host batches -> global sharded arrays: one process here, two processes (gloo) in a subprocess."""

import socket

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import pytest

from conddetr_jax import data
from tests import conftest, processes
from tests.test_data_pipeline import small_config


def _sharding() -> NamedSharding:
  return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))


def test_to_global_arrays_keeps_values_and_shards_the_leading_axis():
  n = len(jax.devices())
  batch = {
    "image": np.arange(n * 2 * 3 * 2 * 3, dtype=np.float32).reshape(n * 2, 3, 2, 3),
    "valid": np.ones(n * 2, bool),
    "image_id": np.arange(n * 2, dtype=np.int64),
  }
  out = data.to_global_arrays(batch, _sharding())
  for key, value in batch.items():
    assert out[key].shape == value.shape and out[key].sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out[key]), value)


def test_prefetch_to_device_yields_every_batch_in_order():
  batches = [{"x": np.full((len(jax.devices()), 2), i, np.float32)} for i in range(5)]
  out = list(data.prefetch_to_device(iter(batches), _sharding(), size=2))
  assert [int(np.asarray(b["x"])[0, 0]) for b in out] == list(range(5))


_WORKER = r"""
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
address, pid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from conddetr_jax import data
from tests.test_data_pipeline import small_config

config = small_config(root)
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
# process index/count from jax
local = data.train_iterator(config, global_batch_size=8, start_step=2)
expected = data.train_iterator(
    config, global_batch_size=8, start_step=2, process_index=0, process_count=1)
for step, batch in enumerate(data.prefetch_to_device(local, sharding)):
  want = next(expected)
  for key, array in batch.items():
    assert array.shape == want[key].shape, (key, array.shape)
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[key][shard.index])
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))(
      batch["box_valid"].astype(np.int32))
  assert int(np.asarray(total.addressable_data(0))) == int(want["box_valid"].sum())
  if step == 2:
    break
print("ok", pid)
"""


@pytest.mark.slow
def test_two_processes_assemble_the_same_global_batches_as_one(tmp_path):
  root = str(tmp_path / "synthetic")
  data.prepare_dataset(small_config(root))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = processes.cpu_env(XLA_FLAGS=conftest.cpu_devices_xla_flags(4), PYTHONPATH=processes.REPO)
  argvs = [["-c", _WORKER, f"127.0.0.1:{port}", str(pid), root] for pid in range(2)]
  for pid, p in enumerate(processes.run_python_together(argvs, env, timeout=300)):
    assert p.returncode == 0 and f"ok {pid}" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
