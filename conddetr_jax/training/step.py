"""One training step: forward with dropout, matching and loss, gradients, AdamW update.

The same function runs under ``jax.jit`` over a sharded global batch (``axis_name=None``: XLA
partitions it) and under ``jax.pmap`` over per-device batches (``axis_name`` set: the criterion
sums the box count over devices and gradients and metrics are averaged with ``pmean``).

Gradient accumulation (``config.grad_accum_steps`` = K > 1): one call still makes exactly one
optimiser update, from the whole global batch, but computes its gradient over K micro-batches in
turn (``lax.scan``), so only one micro-batch's activations are alive at a time. The result is the
gradient of the whole batch's loss, normalised by the whole batch's box count as the original
normalises its batch of 16: each micro-batch's gradient is weighted by its own normaliser, and the
sum divided by the batch's. Clipping and AdamW then see that accumulated gradient once.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from conddetr_jax.criterion import losses
from conddetr_jax.training import ema, optimizer
from conddetr_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` where the scalar ``pred`` holds, else ``on_false``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def set_loss_fn(
  model: flax.linen.Module,
  batch_stats: Any,
  config: ml_collections.ConfigDict,
  axis_name: str | None = None,
) -> LossFn:
  """``loss_fn(params, batch, dropout_rng) -> (loss, metrics)``: the training forward and the set
  criterion."""

  def loss_fn(params, batch, rng):
    out = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      batch["pad_mask"],
      train=True,
      rngs={"dropout": rng},
    )
    terms = losses.set_criterion(out, batch, config, axis_name=axis_name)
    return terms["loss"], terms

  return loss_fn


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """(B, ...) leaves -> (K, B / K, ...): micro-batch k takes rows k, k + K, k + 2K, ...

  The batch's leading axis is sharded in contiguous blocks of a multiple of K rows (one per
  device), so this strided split keeps each micro-batch's rows where they are: every device holds
  B / (K x devices) rows of each micro-batch, and the split moves no data between devices.
  """
  return jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape((-1, accum_steps) + x.shape[1:]), 0, 1), batch
  )


def _box_count(batch: Batch, axis_name: str | None) -> jax.Array:
  """() float32: the number of target boxes in the (global) batch, unclamped."""
  count = batch["box_valid"].sum().astype(jnp.float32)
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def gradients(
  params: Any,
  batch: Batch,
  loss_fn: LossFn,
  rng: jax.Array,
  accum_steps: int = 1,
  axis_name: str | None = None,
) -> tuple[Any, Metrics]:
  """The gradient of the batch's set loss, over ``accum_steps`` micro-batches if > 1.

  Every loss term is divided by the batch's box count N (clamped at 1), so a micro-batch's
  gradient g_k, divided by its own n_k = max(N_k, 1), times n_k, is the gradient of its
  unnormalised loss; their sum divided by max(sum N_k, 1) is the whole batch's gradient, whatever
  the box counts of the micro-batches (a plain mean of the g_k is not). The ``loss*`` metrics are
  combined the same way (the whole batch's values); the others (``class_error``,
  ``cardinality_error*``) are the mean over micro-batches.

  Args:
    params: the trainable parameters.
    batch: the global batch under jit, one device's part under pmap; B divisible by ``accum_steps``.
    loss_fn: ``loss_fn(params, batch, dropout_rng) -> (loss, metrics)`` (``set_loss_fn``).
    rng: the dropout key of this step (micro-batch k uses ``fold_in(rng, k)`` when K > 1).
    accum_steps: K, the number of micro-batches; 0 (a config's "derive it", when the step runs
      outside ``train_and_evaluate``, which resolves it: training/batch.py) means one, as 1 does.
    axis_name: the pmap axis (box counts are summed over it), or None under jit.

  Returns:
    The gradients (the tree of ``params``) and the metrics, before any ``pmean``.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accum_steps <= 1:
    return grad_fn(params, batch, rng)

  def accumulate(carry, indexed_micro_batch):
    grad_sum, metric_sums = carry
    k, micro_batch = indexed_micro_batch
    grads, terms = grad_fn(params, micro_batch, jax.random.fold_in(rng, k))
    n_k = jnp.maximum(_box_count(micro_batch, axis_name), 1.0)
    weights = {name: n_k if name.startswith("loss") else 1.0 for name in terms}
    grad_sum = jax.tree.map(lambda s, g: s + n_k * g, grad_sum, grads)
    metric_sums = {name: metric_sums[name] + weights[name] * terms[name] for name in terms}
    return (grad_sum, metric_sums), None

  micro = _micro_batches(batch, accum_steps)
  metric_shapes = jax.eval_shape(
    lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[1]
  )
  zeros = (
    jax.tree.map(jnp.zeros_like, params),
    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
  )
  (grad_sum, metric_sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
  norm = jnp.maximum(_box_count(batch, axis_name), 1.0)
  grads = jax.tree.map(lambda s: s / norm, grad_sum)
  terms = {
    name: value / (norm if name.startswith("loss") else accum_steps)
    for name, value in metric_sums.items()
  }
  return grads, terms


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
  """Applies one optimiser update for ``batch``.

  A non-finite loss or gradient norm leaves params, optimiser state and the weights' moving
  average (if kept, ``config.ema_decay`` > 0) untouched: the update is skipped on device, whatever
  ``config.skip_nonfinite`` says, and the host decides from ``state.first_nonfinite_step``
  whether to stop the run or go on. The step counter advances either way, so the data position
  stays that of the step.

  Args:
    state: the train state (donated by the callers).
    batch: ``image`` (B, H, W, 3) float32, ``pad_mask`` (B, H, W) bool, ``boxes`` (B, M, 4) cxcywh,
      ``labels`` (B, M) int32, ``box_valid`` (B, M) bool, and the other keys of the data pipeline;
      the global batch under jit, one device's part under pmap; with ``config.grad_accum_steps``
      = K, all K micro-batches of the update (B divisible by K).
    model: the detector.
    tx: the optimiser (``optimizer.build_optimizer``).
    config: the run config (loss weights, matcher).
    axis_name: the pmap axis, or None under jit.

  Returns:
    The new state and scalar metrics: ``loss`` (weighted total), each unweighted loss term,
    ``class_error``, ``cardinality_error``, ``lr`` (the base rate of this update), ``grad_norm``
    (before clipping) and ``finite`` (whether the update was applied).
  """
  dropout_rng = jax.random.fold_in(
    jax.random.wrap_key_data(state.rng, impl=config.rng_impl), state.step
  )
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  loss_fn = set_loss_fn(model, state.batch_stats, config, axis_name)
  grads, terms = gradients(
    state.params, batch, loss_fn, dropout_rng, config.grad_accum_steps, axis_name
  )
  if axis_name is not None:
    # Each device's loss is its share of the global one (the box count is global), so the mean
    # gradient over devices is the global batch's gradient, as with DDP in the original.
    grads, terms = jax.lax.pmean((grads, terms), axis_name)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = _select(
      finite, ema.update(ema_params, params, state.step, config.ema_decay), ema_params
    )
  new_state = state.replace(
    step=state.step + 1,
    params=_select(finite, params, state.params),
    opt_state=_select(finite, opt_state, state.opt_state),
    ema_params=ema_params,
    nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
    first_nonfinite_step=jnp.where(
      (state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step
    ),
  )
  metrics = dict(
    terms, lr=optimizer.applied_learning_rate(opt_state), grad_norm=grad_norm, finite=finite
  )
  return new_state, metrics
