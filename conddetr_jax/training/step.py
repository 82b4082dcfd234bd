"""One training step: forward with dropout, matching and loss, gradients, AdamW update.

The same function runs under ``jax.jit`` over a sharded global batch (``axis_name=None``: XLA
partitions it) and under ``jax.pmap`` over per-device batches (``axis_name`` set: the criterion
sums the box count over devices and gradients and metrics are averaged with ``pmean``).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from conddetr_jax import losses
from conddetr_jax.training import optimizer
from conddetr_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` where the scalar ``pred`` holds, else ``on_false``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def train_step(state: TrainState, batch: Batch, *, model: flax.linen.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """Applies one optimiser update for ``batch``.

  A non-finite loss or gradient norm leaves params and optimiser state untouched (the update is
  skipped on device, whatever ``config.skip_nonfinite`` says): the host decides from
  ``state.first_nonfinite_step`` whether to stop the run or go on. The step counter advances
  either way, so the data position stays that of the step.

  Args:
    state: the train state (donated by the callers).
    batch: ``image`` (B, H, W, 3) float32, ``pad_mask`` (B, H, W) bool, ``boxes`` (B, M, 4) cxcywh,
      ``labels`` (B, M) int32, ``box_valid`` (B, M) bool, and the other keys of the data pipeline;
      the global batch under jit, one device's part under pmap.
    model: the detector.
    tx: the optimiser (``optimizer.build_optimizer``).
    config: the run config (loss weights, matcher).
    axis_name: the pmap axis, or None under jit.

  Returns:
    The new state and scalar metrics: ``loss`` (weighted total), each unweighted loss term,
    ``class_error``, ``cardinality_error``, ``lr`` (the base rate of this update), ``grad_norm``
    (before clipping) and
    ``finite`` (whether the update was applied).
  """
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=config.rng_impl), state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    out = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"], batch["pad_mask"],
                      train=True, rngs={"dropout": dropout_rng})
    terms = losses.set_criterion(out, batch, config, axis_name=axis_name)
    return terms["loss"], terms

  grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    # Each device's loss is its share of the global one (the box count is global), so the mean
    # gradient over devices is the global batch's gradient, as with DDP in the original.
    grads, terms = jax.lax.pmean((grads, terms), axis_name)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1,
      params=_select(finite, params, state.params),
      opt_state=_select(finite, opt_state, state.opt_state),
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1,
                                     state.first_nonfinite_step))
  metrics = dict(terms, lr=optimizer.applied_learning_rate(opt_state), grad_norm=grad_norm, finite=finite)
  return new_state, metrics
