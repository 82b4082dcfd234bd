"""The optimiser matches the original's recipe (torch AdamW + clip_grad_norm_ + StepLR)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conddetr_jax.training import optimizer
from configs import default

STEPS_PER_EPOCH = 2


def _config(**optimizer_fields):
  config = default.get_config()
  config.lr_drop_epoch = 1
  config.optimizer.update(**optimizer_fields)
  return config


def _params(rng: np.random.Generator) -> dict:
  """A tree with the model's naming: stem and layer1 are frozen, layer2+ is backbone, the rest
  transformer."""
  shapes = {
    ("backbone", "conv1", "kernel"): (3, 3, 3, 4),
    ("backbone", "layer1_0", "conv1", "kernel"): (3, 3, 4, 4),
    ("backbone", "layer2_0", "conv1", "kernel"): (3, 3, 4, 8),
    ("input_proj", "kernel"): (1, 1, 8, 6),
    ("input_proj", "bias"): (6,),
    ("class_embed", "bias"): (5,),
  }
  tree = {}
  for path, shape in shapes.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = rng.normal(size=shape).astype(np.float32)
  return tree


def _paths(tree: dict) -> dict:
  return {
    "/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_schedule_drops_tenfold_at_the_epoch_and_warms_up_linearly():
  schedule = optimizer.learning_rate_schedule(_config(lr=1e-4), STEPS_PER_EPOCH)
  np.testing.assert_allclose(
    [schedule(s) for s in (0, 1, 2, 3)], [1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6
  )
  warm = optimizer.learning_rate_schedule(_config(lr=1e-4, warmup_steps=4), 100)
  np.testing.assert_allclose(
    [warm(s) for s in (0, 1, 3, 10)], [2.5e-5, 5e-5, 1e-4, 1e-4], rtol=1e-6
  )


def test_matches_torch_adamw_with_clipping_step_lr_and_a_slower_backbone():
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [
    jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 3, params)
    for _ in range(4)
  ]
  config = _config(lr=1e-4, backbone_lr_mult=0.1, weight_decay=1e-4, clip_grad_norm=0.1)
  schedule = optimizer.learning_rate_schedule(config, STEPS_PER_EPOCH)
  tx = optimizer.build_optimizer(config, params, schedule)
  opt_state = tx.init(params)
  ours = jax.tree.map(jnp.asarray, params)
  applied = []
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    applied.append(float(optimizer.applied_learning_rate(opt_state)))

  # The original: frozen tensors have requires_grad=False; param groups by "backbone" in the name.
  named = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _paths(params).items()}
  frozen = {k for k in named if k.startswith(("backbone/conv1", "backbone/layer1"))}
  backbone = [p for k, p in named.items() if k.startswith("backbone") and k not in frozen]
  rest = [p for k, p in named.items() if not k.startswith("backbone")]
  torch_opt = torch.optim.AdamW(
    [{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4, weight_decay=1e-4
  )
  lr_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1)  # stepped once per epoch
  torch_lrs = []
  for step, g in enumerate(grads):
    for k, v in _paths(g).items():
      named[k].grad = torch.tensor(v)
    torch.nn.utils.clip_grad_norm_(list(named.values()), 0.1)  # over the same tensors as ours
    for k in frozen:
      named[k].grad = None
    torch_lrs.append(torch_opt.param_groups[0]["lr"])
    torch_opt.step()
    if (step + 1) % STEPS_PER_EPOCH == 0:
      lr_sched.step()

  np.testing.assert_allclose(applied, torch_lrs, rtol=1e-6)
  for k, v in _paths(ours).items():
    np.testing.assert_allclose(
      np.asarray(v), named[k].detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=k
    )
  for k in frozen:
    np.testing.assert_array_equal(np.asarray(_paths(ours)[k]), _paths(params)[k], err_msg=k)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_frozen_params_never_move_and_backbone_steps_are_a_tenth(weight_decay):
  params = jax.tree.map(jnp.ones_like, _params(np.random.default_rng(1)))
  grads = jax.tree.map(jnp.ones_like, params)
  config = _config(lr=1e-3, backbone_lr_mult=0.1, weight_decay=weight_decay, clip_grad_norm=1e9)
  tx = optimizer.build_optimizer(
    config, params, optimizer.learning_rate_schedule(config, STEPS_PER_EPOCH)
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {k: float(np.max(np.abs(v))) for k, v in _paths(updates).items()}
  # Adam's first step is lr * sign(grad); weight decay adds lr * wd * param.
  assert moved["backbone/conv1/kernel"] == 0.0 and moved["backbone/layer1_0/conv1/kernel"] == 0.0
  np.testing.assert_allclose(moved["input_proj/bias"], 1e-3 * (1 + weight_decay), rtol=1e-4)
  np.testing.assert_allclose(
    moved["backbone/layer2_0/conv1/kernel"], 1e-4 * (1 + weight_decay), rtol=1e-4
  )


def test_unfrozen_stem_and_layer1_step_with_the_backbone():
  params = jax.tree.map(jnp.ones_like, _params(np.random.default_rng(2)))
  grads = jax.tree.map(jnp.ones_like, params)
  config = _config(lr=1e-3, backbone_lr_mult=0.5, weight_decay=0.0, clip_grad_norm=1e9)
  config.model.freeze_stem_and_layer1 = False
  tx = optimizer.build_optimizer(
    config, params, optimizer.learning_rate_schedule(config, STEPS_PER_EPOCH)
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {k: float(np.max(np.abs(v))) for k, v in _paths(updates).items()}
  for k in (
    "backbone/conv1/kernel",
    "backbone/layer1_0/conv1/kernel",
    "backbone/layer2_0/conv1/kernel",
  ):
    np.testing.assert_allclose(moved[k], 5e-4, rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(moved["input_proj/bias"], 1e-3, rtol=1e-4)
