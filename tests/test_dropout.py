"""models.dropout: masks hashed from each element's position, with nn.Dropout's behaviour, in every
transformer dropout."""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.models import dropout, transformer
from configs import test_tiny


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_rate_on_a_large_draw(rate):
  n = 1 << 22
  kept = float(jnp.mean(dropout.keep_mask(jax.random.key(3), (n,), rate)))
  # 5 standard deviations of the mean plus the 32-bit threshold's rounding (<= 2**-33).
  tolerance = 5 * np.sqrt(rate * (1 - rate) / n) + 2.0**-33
  assert abs(kept - (1 - rate)) < tolerance, (rate, kept)


def test_kept_values_are_scaled_by_one_over_keep_probability_and_dropped_ones_are_zero():
  x = jnp.linspace(1.0, 2.0, 4096).reshape(64, 64)
  y = dropout.Dropout(0.25).apply({}, x, deterministic=False, rng=jax.random.key(0))
  kept = y != 0
  assert 0 < int(kept.sum()) < x.size
  np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-6)


def test_rate_zero_and_deterministic_are_identity_and_rate_one_gives_zeros():
  x = jax.random.normal(jax.random.key(1), (8, 16))
  rng = {"dropout": jax.random.key(2)}
  assert dropout.Dropout(0.0).apply({}, x, deterministic=False, rngs=rng) is x
  assert dropout.Dropout(0.5, deterministic=True).apply({}, x) is x
  np.testing.assert_array_equal(
    dropout.Dropout(1.0).apply({}, x, deterministic=False, rngs=rng), jnp.zeros_like(x)
  )
  assert bool(dropout.keep_mask(jax.random.key(0), (4,), 0.0).all())
  assert not bool(dropout.keep_mask(jax.random.key(0), (4,), 1.0).any())
  with pytest.raises(ValueError, match="not in"):
    dropout.keep_mask(jax.random.key(0), (4,), 1.5)


def test_masks_differ_across_keys_and_repeat_for_the_same_key():
  shape = (32, 32)
  a, b = (dropout.keep_mask(jax.random.key(i), shape, 0.5) for i in (0, 1))
  np.testing.assert_array_equal(a, dropout.keep_mask(jax.random.key(0), shape, 0.5))
  assert bool(jnp.any(a != b))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_neighbouring_elements_are_uncorrelated_along_every_axis(axis):
  # The hash of an affine map of the flat index: neighbours along the last axis differ by the
  # multiplier, along the others by a multiple of it; none may leave a pattern in the mask.
  mask = np.asarray(dropout.keep_mask(jax.random.key(5), (64, 64, 64), 0.5), np.float64)
  a, b = np.moveaxis(mask, axis, 0)[:-1].ravel(), np.moveaxis(mask, axis, 0)[1:].ravel()
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_the_training_forward_draws_only_two_32_bit_numbers_per_mask():
  # The tiny model's training forward (both attention implementations): every random draw is the
  # (2,) uint32 seed of a hashed mask, so no mask's worth of random bits is drawn into memory and
  # no dropout is left on flax's bernoulli.
  config = test_tiny.get_config()
  x = jnp.zeros((1, 64, 64, 3))
  mask = jnp.zeros((1, 64, 64), bool)
  for attention in ("dense", "blockwise"):
    with config.unlocked():
      config.model.attention = attention
    model = models.build_model(config)
    variables = models.init_variables(model, jax.random.key(0), abstract=True)
    jaxpr = str(
      jax.make_jaxpr(
        lambda v: model.apply(v, x, mask, train=True, rngs={"dropout": jax.random.key(1)})
      )(variables)
    )
    draws = re.findall(r"random_bits\[\s*bit_width=(\d+)\s+shape=\(([^)]*)\)", jaxpr)
    assert draws and set(draws) == {("32", "2,")}, (attention, sorted(set(draws)))


def test_a_mask_depends_only_on_each_element_s_flat_position():
  # What makes the masks independent of how a batch is split over devices: an element's bits are
  # those of its row-major position, whatever the array's shape.
  key = jax.random.key(7)
  np.testing.assert_array_equal(
    dropout.keep_mask(key, (2, 3, 4, 5), 0.3).ravel(), dropout.keep_mask(key, (120,), 0.3)
  )


def _residual_arrays(vjp_fn):
  """The arrays a ``jax.vjp`` function keeps for the backward pass, as (shape, dtype) pairs."""
  return [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(vjp_fn)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_dropout_equals_autodiff_of_relu_then_dropout_and_keeps_only_its_output(dtype):
  x = jax.random.normal(jax.random.key(0), (64, 96), dtype).at[0, :8].set(0)
  rate = 0.25
  cotangent = jax.random.normal(jax.random.key(2), x.shape, dtype)

  def autodiff(x):  # the mask drawn inside, as in the model, so that it is a residual there too
    return dropout.Dropout(rate).apply(
      {}, jax.nn.relu(x), deterministic=False, rng=jax.random.key(1)
    )

  def fused(x):
    return dropout.relu_dropout(x, dropout.keep_mask(jax.random.key(1), x.shape, rate), rate, True)

  # Compiled, as in the model (eagerly, XLA:CPU divides by 1 - rate in one op and not the other).
  want, want_vjp = jax.vjp(jax.jit(autodiff), x)
  got, got_vjp = jax.vjp(jax.jit(fused), x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])
  assert (x.shape, jnp.dtype(jnp.bool_)) in _residual_arrays(want_vjp)
  # No mask and no input kept: the backward pass reads the output alone and draws nothing.
  assert _residual_arrays(got_vjp) == [(x.shape, jnp.dtype(dtype))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unscaled_relu_dropout_equals_autodiff_of_relu_then_mask_and_keeps_only_its_output(dtype):
  x = jax.random.normal(jax.random.key(0), (64, 96), dtype).at[0, :8].set(0)
  keep = dropout.keep_mask(jax.random.key(1), x.shape, 0.25)
  cotangent = jax.random.normal(jax.random.key(2), x.shape, dtype)
  autodiff = lambda x: jnp.where(keep, jax.nn.relu(x), jnp.zeros_like(x))
  want, want_vjp = jax.vjp(jax.jit(autodiff), x)
  got, got_vjp = jax.vjp(jax.jit(lambda x: dropout.relu_dropout(x, keep, 0.25, False)), x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])
  assert _residual_arrays(got_vjp) == [(x.shape, jnp.dtype(dtype))]


def test_after_relu_is_relu_then_the_module_s_own_dropout():
  x = jax.random.normal(jax.random.key(0), (32, 48))
  rngs = {"dropout": jax.random.key(4)}
  module = dropout.Dropout(0.3)
  for deterministic in (False, True):
    y, scale = module.apply({}, x, deterministic, method="after_relu", rngs=rngs)
    np.testing.assert_array_equal(y, module.apply({}, jax.nn.relu(x), deterministic, rngs=rngs))
    assert scale == 1.0


def test_after_relu_with_a_deferred_scale_leaves_the_kept_values_unscaled():
  x = jax.random.normal(jax.random.key(0), (32, 48))
  rngs = {"dropout": jax.random.key(4)}
  module = dropout.Dropout(0.3)
  want = module.apply({}, jax.nn.relu(x), False, rngs=rngs)
  y, scale = module.apply({}, x, False, True, method="after_relu", rngs=rngs)
  assert scale == pytest.approx(1 / 0.7)
  np.testing.assert_allclose(y * scale, want, rtol=1e-6)
  assert bool(((y == 0) == (want == 0)).all())  # the same elements dropped
  # Nothing dropped, nothing deferred: the scale is 1 and the values flax's.
  y, scale = module.apply({}, x, True, True, method="after_relu", rngs=rngs)
  assert scale == 1.0
  np.testing.assert_array_equal(y, jax.nn.relu(x))


def test_bfloat16_kept_values_are_scaled_by_the_float32_one_over_keep_probability():
  # bf16 arithmetic would divide by bf16's 0.9 (0.8984375), which rounds a third of these values
  # one step higher (0.1875 -> 0.208984375 instead of 0.2080078125).
  x = (jnp.arange(1, 256) / 64).astype(jnp.bfloat16)
  y = dropout.Dropout(0.1).apply({}, x, deterministic=False, rng=jax.random.key(0))
  kept = y != 0
  assert 0 < int(kept.sum()) < x.size
  want = (x.astype(jnp.float32) / 0.9).astype(jnp.bfloat16)
  np.testing.assert_array_equal(y[kept], want[kept])


class _FlaxFeedForward(nn.Module):
  """The feed-forward layer written out as flax's ops (Dense, relu, Dropout, Dense), under the
  same module names, so that it has FeedForward's parameters and dropout keys."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = transformer.linear(64, 16, "linear1", self.dtype)(x)
    y = dropout.Dropout(0.1)(jax.nn.relu(y), deterministic=False)
    return transformer.linear(16, 64, "linear2", self.dtype)(y)


def _feed_forward_and_reference(dtype):
  """The transformer's FeedForward in training and ``_FlaxFeedForward``, with the same parameters
  and dropout key."""
  config = transformer.TransformerConfig(
    d_model=16, nhead=2, dim_feedforward=64, dropout=0.1, dtype=dtype,
    attention="dense", attention_block_size=64, remat="none", deterministic=False,
  )  # fmt: skip
  x = jax.random.normal(jax.random.key(0), (2, 24, 16), dtype)
  rngs = {"dropout": jax.random.key(3)}
  layer = transformer.FeedForward(config)
  params = layer.init(rngs | {"params": jax.random.key(1)}, x)["params"]
  ours = lambda params, x: layer.apply({"params": params}, x, rngs=rngs)
  reference = lambda params, x: _FlaxFeedForward(dtype).apply({"params": params}, x, rngs=rngs)
  return ours, reference, params, x


# An elementwise scale of the (2, 24, 64) hidden layer in a jaxpr.
_HIDDEN_SCALED = re.compile(r"(bf16|f32)\[2,24,64\] = (div|mul) ")


def test_float32_feed_forward_is_flax_s_ops_bit_for_bit():
  ours, reference, params, x = _feed_forward_and_reference(jnp.float32)
  np.testing.assert_array_equal(jax.jit(ours)(params, x), jax.jit(reference)(params, x))
  assert _HIDDEN_SCALED.search(str(jax.make_jaxpr(ours)(params, x)))


def test_bfloat16_feed_forward_scales_the_product_and_matches_flax_s_ops_to_rounding():
  ours, reference, params, x = _feed_forward_and_reference(jnp.bfloat16)
  got, got_vjp = jax.vjp(jax.jit(ours), params, x)
  want, want_vjp = jax.vjp(jax.jit(reference), params, x)
  f32 = lambda t: np.asarray(t, np.float32)
  np.testing.assert_allclose(f32(got), f32(want), rtol=0.02, atol=0.02)
  cotangent = jax.random.normal(jax.random.key(5), got.shape, jnp.bfloat16)
  for g, w in zip(jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent))):
    np.testing.assert_allclose(f32(g), f32(w), rtol=0.03, atol=0.03 * float(np.abs(f32(w)).max()))
  # The dropout's scale is deferred to linear2's (2, 24, 16) product: the hidden layer is not
  # scaled, forward or backward.
  step = lambda params, x: jax.vjp(ours, params, x)[1](cotangent)
  assert not _HIDDEN_SCALED.search(str(jax.make_jaxpr(step)(params, x)))
