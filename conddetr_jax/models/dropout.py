"""Dropout whose masks come from 16-bit random bits: every dropout of the transformer uses it.

Flax's ``nn.Dropout`` draws its mask with ``jax.random.bernoulli``, i.e. 32 bits per element
turned into a float32 uniform and compared: under bf16 compute that moves more bytes than the
activation being dropped. Here the mask is ``bits < round((1 - rate) * 2**16)`` on uint16 bits, so
the keep probability is a multiple of 1/65536: it differs from ``1 - rate`` by at most 1/131072
(rounding), well within 1/65536. Outputs are still scaled by ``1 / (1 - rate)``, as flax does.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

_BITS = 16
_LEVELS = 1 << _BITS


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean mask of ``shape``, True (kept) with probability ``1 - rate`` (to within 1/65536).

  Args:
    rng: a PRNG key (any implementation: rbg, threefry).
    shape: the mask's shape.
    rate: the drop probability, in [0, 1].
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"dropout rate {rate} is not in [0, 1]")
  threshold = round((1.0 - rate) * _LEVELS)
  if threshold >= _LEVELS:  # 1 - rate rounds to 1: uint16 bits cannot all be below 65536
    return jnp.ones(shape, bool)
  return jax.random.bits(rng, shape, jnp.uint16) < jnp.uint16(threshold)


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
