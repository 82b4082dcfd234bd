"""One step on 8 CPU devices, jit-sharded (with the state replicated and split over the devices),
and pmap with 2 accumulated micro-batches, equals the same global batch on one device; a step
compiled ahead (``compile``) is not compiled again when run.

The device count must be set before JAX starts, so the steps run in a subprocess.
"""

import os

import numpy as np
import pytest

from tests import processes

SCRIPT = """
import sys
import jax
import numpy as np
from jax._src import monitoring
from configs import test_tiny
from conddetr_jax import models
from conddetr_jax import sharding
from conddetr_jax.training import optimizer, parallel, step as step_lib, state as state_lib

assert jax.device_count() == 8
config = test_tiny.get_config()
config.model.dropout = 0.0  # pmap draws dropout masks per device (jit's do not depend on the split)
model = models.build_model(config)
variables = models.init_variables(model, jax.random.PRNGKey(0))
tx = optimizer.build_optimizer(
    config, variables["params"], optimizer.learning_rate_schedule(config, 100))
# On the host: the steps donate their device copies.
initial = jax.device_get(
    state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config)))
accumulating = config.copy_and_resolve_references()
accumulating.grad_accum_steps = 2
step_fns = {k: lambda state, batch, axis_name=None, c=c: step_lib.train_step(
                state, batch, model=model, tx=tx, config=c, axis_name=axis_name)
            for k, c in ((1, config), (2, accumulating))}

rng = np.random.default_rng(0)
boxes = np.concatenate([rng.uniform(0.3, 0.7, (16, 8, 2)), rng.uniform(0.1, 0.3, (16, 8, 2))], -1)
pad_mask = np.zeros((16, 64, 64), bool)
pad_mask[::2, 40:] = True
# 1, 2, 3, 0, 1, ... boxes per image
box_valid = np.arange(8)[None, :] < np.arange(1, 17)[:, None] % 4
batch = {"image": rng.normal(size=(16, 64, 64, 3)).astype(np.float32), "pad_mask": pad_mask,
         "boxes": boxes.astype(np.float32), "labels": rng.integers(1, 10, (16, 8)).astype(np.int32),
         "box_valid": box_valid}

compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)
out = {}
# pmap: 2 images per device, as 2 micro-batches of 1 (their box counts, 16 and 8, summed over
# devices).
mesh = sharding.make_mesh()
split = parallel.train_state_sharding(initial, mesh, shard=True)
# The rule: the longest axis 8 divides (the first on a tie), else a copy per device.
for shape in ((3, 3, 64, 128), (256, 256), (4, 1, 512), (91,), (4,), ()):
  spec = sharding.split_over_data(jax.ShapeDtypeStruct(shape, np.float32), mesh).spec
  out["spec" + str(shape)] = str(tuple(spec))
for name, make, devices, accum_steps in (
    ("one", parallel.JitParallel, jax.devices()[:1], 1),
    ("jit", parallel.JitParallel, jax.devices(), 1),
    ("jit_split", lambda f, m: parallel.JitParallel(f, m, split), jax.devices(), 1),
    ("pmap", parallel.PmapParallel, jax.devices(), 2)):
  par = make(step_fns[accum_steps], sharding.make_mesh(devices))
  device_batch = jax.device_put(par.host_batch(batch), par.batch_sharding)
  state = par.device_state(initial)
  par.compile(state, device_batch)
  compiled = len(compiles)
  state, metrics = par.step(state, device_batch)
  out[name + "_compiles_in_first_step"] = len(compiles) - compiled
  out[name + "_devices"] = len(device_batch["image"].sharding.device_set)
  out[name + "_loss"] = jax.device_get(par.local(metrics))["loss"]
  # Arrays of the state after the step that each device holds a slice of, not a copy.
  for field in ("params", "opt_state", "batch_stats"):
    arrays = jax.tree.leaves(getattr(par.host_state(state), field))
    out[f"{name}_split_{field}"] = sum(not x.sharding.is_fully_replicated for x in arrays)
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      jax.device_get(par.host_state(state).params)):
    out[name + jax.tree_util.keystr(path)] = leaf
for path, leaf in jax.tree_util.tree_leaves_with_path(initial.params):
  out["initial" + jax.tree_util.keystr(path)] = leaf
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
def test_one_step_is_the_same_on_one_device_jit_sharded_over_8_and_pmap_over_8_accumulating_2(
  tmp_path,
):
  env = processes.cpu_env(
    PYTHONPATH=processes.REPO,
    XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip(),
  )
  processes.run_python_ok("-c", SCRIPT, str(tmp_path / "out.npz"), env=env, timeout=900)
  out = dict(np.load(tmp_path / "out.npz"))

  names = ("one", "jit", "jit_split", "pmap")
  assert [int(out[f"{n}_devices"]) for n in names] == [1, 8, 8, 8]
  assert [int(out[f"{n}_compiles_in_first_step"]) for n in names] == [0, 0, 0, 0]
  split = {
    n: [int(out[f"{n}_split_{f}"]) for f in ("params", "opt_state", "batch_stats")] for n in names
  }
  assert split["one"] == split["jit"] == split["pmap"] == [0, 0, 0]
  # Split: each weight with an axis 8 divides, and both AdamW moments of the trained ones.
  param_keys = [k[len("one") :] for k in out if k.startswith("one[")]
  divisible = sum(any(n % 8 == 0 for n in out["one" + k].shape) for k in param_keys)
  params, opt_state, batch_stats = split["jit_split"]
  assert params == divisible > 0
  assert opt_state % 2 == 0 and params < opt_state <= 2 * params
  assert batch_stats == 0
  assert {k[len("spec") :]: str(out[k]) for k in out if k.startswith("spec")} == {
    "(3, 3, 64, 128)": "(None, None, None, 'data')",
    "(256, 256)": "('data',)",
    "(4, 1, 512)": "(None, None, 'data')",
    "(91,)": "()",
    "(4,)": "()",
    "()": "()",
  }
  for name in ("jit", "jit_split", "pmap"):
    np.testing.assert_allclose(out[name + "_loss"], out["one_loss"], rtol=1e-5)
  moved = 0
  for key in param_keys:
    for name in ("jit", "jit_split", "pmap"):
      np.testing.assert_allclose(
        out[name + key], out["one" + key], atol=1e-5, rtol=0, err_msg=name + key
      )
    moved += not np.array_equal(out["one" + key], out["initial" + key])
  assert moved > len(param_keys) // 2  # the step did update the parameters being compared
