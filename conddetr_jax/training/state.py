"""The train state: everything a resumed run needs to continue bit-for-bit."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  """Parameters, optimiser state and counters of a run; a pytree, checkpointed as a whole.

  Attributes:
    step: () int32, optimiser updates done (skipped non-finite updates included), which is also
      the position of the data iterator.
    params: the model's trainable ``variables['params']`` (float32).
    batch_stats: the frozen BatchNorm tensors (never updated; kept for eval and checkpoints).
    opt_state: the optax state of ``build_optimizer``.
    rng: the raw data (uint32) of the run's base dropout key, of ``config.rng_impl``; step ``s``
      uses ``fold_in(key, s)``, so a resumed run draws the same masks as an uninterrupted one.
    nonfinite_count: () int32, updates skipped because the loss or a gradient was not finite.
    first_nonfinite_step: () int32, the first such update's step number (the value ``step``
      took after it, as logged), -1 if none: the host reads it at log and checkpoint steps,
      without a per-step device sync.
    ema_params: the exponential moving average of ``params`` (``training/ema.py``) when
      ``config.ema_decay`` > 0, else None (no leaves: the state and its checkpoints are as without).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_count: jax.Array
  first_nonfinite_step: jax.Array
  ema_params: Any = None

  @property
  def variables(self) -> dict[str, Any]:
    """``{'params', 'batch_stats'}``, as ``model.apply`` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
  variables: Any, tx: optax.GradientTransformation, rng: jax.Array, keep_ema: bool = False
) -> TrainState:
  """A state at step 0 from the model's variables.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` from ``model.init`` or a converter.
    tx: the optimiser (``build_optimizer``).
    rng: raw key data (``jax.random.key_data``), the base of every dropout key.
    keep_ema: start a moving average of the weights (``config.ema_decay`` > 0) at ``params``.

  Returns:
    The state; call under ``jax.jit`` to create it directly with the wanted shardings.
  """
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=rng,
    nonfinite_count=jnp.zeros((), jnp.int32),
    first_nonfinite_step=jnp.full((), -1, jnp.int32),
    ema_params=jax.tree.map(jnp.copy, params) if keep_ema else None,
  )


def evaluated_variables(state: TrainState, use_ema: bool) -> dict[str, Any]:
  """The variables a run evaluates and draws: the weights' moving average where the state keeps
  one and ``use_ema`` (``config.evaluation.use_ema``) says so, else ``state.variables``."""
  if state.ema_params is None or not use_ema:
    return state.variables
  return {"params": state.ema_params, "batch_stats": state.batch_stats}


def dropout_key_data(config: ml_collections.ConfigDict) -> jax.Array:
  """The raw data of the run's base dropout key: ``config.rng_impl`` seeded by ``config.seed``.

  RBG (XLA's RngBitGenerator) is the default: threefry's dropout masks made the tiny test
  model's train step 2.5x slower to compile on CPU.
  """
  return jax.random.key_data(
    jax.random.fold_in(jax.random.key(config.seed, impl=config.rng_impl), 1)
  )
