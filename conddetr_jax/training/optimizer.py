"""The original's optimiser as one optax expression: clipping, then AdamW per parameter group.

- ``clip_by_global_norm(config.optimizer.clip_grad_norm)`` over all gradients (the frozen ones
  are zero, so they don't change the norm), as ``torch.nn.utils.clip_grad_norm_`` in the original;
- AdamW with decoupled weight decay on every trainable tensor, biases and norms included (the
  original puts them all in decayed groups);
- the backbone (layer2-4) at ``lr * backbone_lr_mult``; the stem and layer1 get no update at all
  (``set_to_zero``: AdamW's weight decay would otherwise move them) unless
  ``config.model.freeze_stem_and_layer1`` is False, when they join the backbone group. Frozen
  BatchNorm tensors live in ``batch_stats`` and never reach the optimiser.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from conddetr_jax import models

Schedule = Callable[[Any], Any]


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """The base learning rate after ``step`` updates (optax's ``count``): warmup, then a step drop.

  The original's ``StepLR(lr_drop)`` is stepped per epoch, so the drop happens after
  ``lr_drop_epoch * steps_per_epoch`` updates. The optional linear warmup (``warmup_steps`` > 0)
  ramps from ``lr / warmup_steps`` at the first update to ``lr``.

  Args:
    config: the run config (``optimizer.lr``, ``optimizer.warmup_steps``,
      ``optimizer.lr_drop_factor``, ``lr_drop_epoch``).
    steps_per_epoch: optimiser updates per epoch.

  Returns:
    schedule(step) -> () float32 learning rate, usable on ints and traced int arrays.
  """
  opt = config.optimizer
  drop_step = config.lr_drop_epoch * steps_per_epoch
  warmup = opt.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.where(step >= drop_step, opt.lr * opt.lr_drop_factor, opt.lr)
    if warmup > 0:
      lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
    return lr.astype(jnp.float32)

  return schedule


def build_optimizer(
  config: ml_collections.ConfigDict, params: Any, schedule: Schedule
) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per group of ``models.param_labels(params)``.

  The learning rate is an injected hyperparameter, so the optimiser state records the rate each
  update used (``applied_learning_rate``).

  Args:
    config: the run config (``optimizer.*``).
    params: the model's ``variables['params']`` (only its structure and key paths are used).
    schedule: the base learning rate schedule (``learning_rate_schedule``), evaluated at the
      number of updates applied so far.

  Returns:
    The optax transformation; its updates are added to ``params`` with ``optax.apply_updates``.
  """
  opt = config.optimizer
  labels = models.param_labels(params, config.model.freeze_stem_and_layer1)

  def clipped_adamw(learning_rate):
    return optax.chain(
      optax.clip_by_global_norm(opt.clip_grad_norm),
      optax.multi_transform(
        {
          "transformer": optax.adamw(learning_rate, weight_decay=opt.weight_decay),
          "backbone": optax.adamw(
            learning_rate * opt.backbone_lr_mult, weight_decay=opt.weight_decay
          ),
          "frozen": optax.set_to_zero(),
        },
        labels,
      ),
    )

  return optax.inject_hyperparams(clipped_adamw)(learning_rate=schedule)


def applied_learning_rate(opt_state: Any) -> jax.Array:
  """() float32: the base learning rate of the last update, from ``build_optimizer``'s state."""
  return opt_state.hyperparams["learning_rate"]
