"""Dropout whose masks are a hash of each element's position: every dropout of the transformer
uses it.

Flax's ``nn.Dropout`` draws its mask with ``jax.random.bernoulli``: random bits of the mask's
shape, generated into memory and read back by the forward and the backward pass. For the attention
weights that is a (B, heads, Lq, Lk) tensor per layer, moved like the weights themselves (R50 at
800x1216: 29 MB per encoder layer for 2 images). Here the key gives two 32-bit numbers (m, s), and
element i's bits are MurmurHash3's 32-bit finaliser of ``i * (m | 1) + s`` (an affine map of the
flat index, as SplitMix's counter): integer arithmetic on iotas, which XLA fuses into every
consumer, so no mask exists in memory and the backward pass computes it again where it needs it
(R50 bf16 on v5e: the encoder's bytes 8.91 -> 5.29 GB per chip, FLOPs +2%; docs/accelerators.md).
Elements are kept when their 32 bits fall below ``round((1 - rate) * 2**32)``, a keep probability
of ``1 - rate`` to within 2**-32; kept values are scaled by ``1 / (1 - rate)``, as flax does.

The index is the element's position in the whole array, so a batch split over devices draws the
masks it draws on one device (XLA partitions the iota). Two keys' masks relate only through an
affine permutation of positions (never a shift, unless both multipliers are equal: probability
2**-31). Positions are taken modulo 2**32: masks of more elements (DC5's encoder attention for a
global batch over 37 images at 800x1216) repeat after 2**32 elements, across different images.
"""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_LEVELS = 1 << 32


def _mix(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser without its last step: a bijection of uint32 whose high bits
  each depend on all input bits. The last step (``x ^ x >> 16``) only changes the low 16 bits,
  which decide a comparison with a threshold only when the high 16 bits equal the threshold's
  (probability 2**-16): it would cost two operations per element for nothing."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  return x * jnp.uint32(0xC2B2AE35)


def _affine_index(shape: tuple[int, ...], multiplier: jax.Array, offset: jax.Array) -> jax.Array:
  """uint32 array of ``shape``: ``i * multiplier + offset`` (modulo 2**32) for each element's
  row-major position i, summed axis by axis (each axis's stride times the multiplier is one scalar,
  so an element costs one multiply and one add per axis)."""
  out = jnp.broadcast_to(offset, shape)
  stride = 1
  for axis in reversed(range(len(shape))):
    coefficient = multiplier * jnp.uint32(stride % _LEVELS)
    out = out + lax.broadcasted_iota(jnp.uint32, shape, axis) * coefficient
    stride *= shape[axis]
  return out


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean mask of ``shape``, True (kept) with probability ``1 - rate`` (to within 2**-32).

  Args:
    rng: a PRNG key (any implementation: rbg, threefry); the same key gives the same mask.
    shape: the mask's shape.
    rate: the drop probability, in [0, 1].
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate {rate} is not in [0, 1]")
  threshold = round((1.0 - rate) * _LEVELS)
  if threshold >= _LEVELS:  # 1 - rate rounds to 1: uint32 bits cannot all be below 2**32
    return jnp.ones(shape, bool)
  multiplier, offset = jax.random.bits(rng, (2,), jnp.uint32)
  bits = _mix(_affine_index(shape, multiplier | jnp.uint32(1), offset))
  return bits < jnp.uint32(threshold)


class Dropout(nn.Module):
  """``nn.Dropout``'s interface (``rate``, ``deterministic``, ``rng_collection``) with masks from
  ``keep_mask``.

  Named ``Dropout`` as flax's, so the modules' automatic names, and with them the dropout keys each
  derives from the ``dropout`` collection, stay those of ``nn.Dropout``.
  """

  rate: float
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(
    self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    """``inputs`` with each element zeroed with probability ``rate`` and the rest scaled by
    ``1 / (1 - rate)``; unchanged when deterministic or ``rate == 0``, zeros when ``rate == 1``.

    Args:
      inputs: any array.
      deterministic: overrides the attribute (one of the two must be given).
      rng: the mask's key; default ``make_rng(rng_collection)``.
    """
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:  # as flax: no 1 / 0 scale
      return jnp.zeros_like(inputs)
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    keep = keep_mask(rng, inputs.shape, self.rate)
    return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
