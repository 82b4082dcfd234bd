"""models.dropout: masks hashed from each element's position, with nn.Dropout's behaviour, in every
transformer dropout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.models import dropout
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
