"""An exponential moving average of the weights (``config.ema_decay`` > 0), evaluated in their
place.

The average after update ``t`` (counted from 0) is ``ema = d_t * ema + (1 - d_t) * params`` with
``d_t = min(ema_decay, (1 + t) / (10 + t))``, the warm-up of TensorFlow's
``ExponentialMovingAverage(num_updates=...)``: early weights, far from the final ones, fade within
about ``t / 9`` steps instead of ``1 / (1 - ema_decay)``, so the average is useful from the first
evaluation on, and a short run's average never lags far behind its weights. Not in the original (its
runs evaluate the raw weights); measured on the demo in docs/demo-levers.md.
"""

from typing import Any

import jax
import jax.numpy as jnp


def decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """() float32: the decay of the update after ``step`` earlier updates."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


def update(ema_params: Any, params: Any, step: jax.Array, ema_decay: float) -> Any:
  """The average after ``step`` earlier updates, moved towards the just-updated ``params``."""
  d = decay_at(step, ema_decay)
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)
