"""The train step with the backbone's CPU-friendly ops against the ops they replaced, in one
process.

Usage:
  python benchmarks/backbone_ops.py --config=configs/r50.py --batch=2 --size=384x512 [--rounds=5]

Compiles the train step twice: as it is, and with the ops it had before (every 1x1 conv as
``lax.conv_general_dilated``, the stem max-pool as ``nn.max_pool``), then checks that both give the
same loss over two steps and times them one step each in turn for --rounds rounds, so that on a
shared machine both see the same load. Prints each one's median step and the speed ratio
(docs/cpu-step.md).
"""

import os
import statistics
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from benchmarks.synthetic import synthetic_batch
from conddetr_jax import models
from conddetr_jax.models import convolution, pooling
from conddetr_jax.training import optimizer
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model/optimiser config.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_SIZE = flags.DEFINE_string("size", "384x512", "HxW of the batch.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (one step of each variant per round).")


def _previous_max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  h, w = (int(v) for v in _SIZE.value.split("x"))
  batch = jax.device_put(
    synthetic_batch(
      _BATCH.value, h, w, config.dataset.max_boxes, num_classes=config.model.num_classes
    )
  )
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  tx = optimizer.build_optimizer(
    config, variables["params"], optimizer.learning_rate_schedule(config, 1000)
  )
  initial = state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config))
  fresh = lambda: jax.tree.map(jnp.copy, initial)  # each run donates its own copy
  current = (convolution.conv_general_dilated, pooling.max_pool_3x3_stride2)
  compiled = {}
  for name, (conv, pool) in {
    "previous ops": (lax.conv_general_dilated, _previous_max_pool),
    "current ops": current,
  }.items():
    # The modules look these up when traced, so each variant compiles with its own ops.
    convolution.conv_general_dilated, pooling.max_pool_3x3_stride2 = conv, pool
    step = lambda s, b: step_lib.train_step(s, b, model=model, tx=tx, config=config)
    compiled[name] = jax.jit(step, donate_argnums=0).lower(fresh(), batch).compile()
  convolution.conv_general_dilated, pooling.max_pool_3x3_stride2 = current

  states, losses = {}, {}
  for name, fn in compiled.items():
    state, first = fn(fresh(), batch)
    states[name], second = fn(state, batch)
    losses[name] = (float(first["loss"]), float(second["loss"]))
  print(f"losses over two steps: {losses}", flush=True)
  times = {name: [] for name in compiled}
  for _ in range(_ROUNDS.value):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      states[name], metrics = fn(states[name], batch)
      metrics["loss"].block_until_ready()
      times[name].append(time.perf_counter() - t0)
  base = statistics.median(times["previous ops"])
  for name, record in times.items():
    median = statistics.median(record)
    print(
      f"{name}: step {median:.3f}s (range {min(record):.3f}-{max(record):.3f}s), "
      f"{base / median:.2f}x the previous ops' speed",
      flush=True,
    )
  print(f"loadavg={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
