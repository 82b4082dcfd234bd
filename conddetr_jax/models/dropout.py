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
of ``1 - rate`` to within 2**-32; kept values are scaled by ``1 / (1 - rate)``, as flax does
(``scale_kept``).

Computing a mask costs integer work each time (XLA counted a third of it as the R50 step's excess
FLOPs over the RBG masks'), and XLA computed each mask three times: in the forward pass, for the
next product's weight gradient and for the dropped tensor's own. Where the dropped tensor is a
ReLU's output (``relu_dropout``) or a softmax's (``attention.dropped_attention``), the backward
pass needs no mask: it reads it from the one tensor it keeps, so each mask is computed once.

The index is the element's position in the whole array, so a batch split over devices draws the
masks it draws on one device (XLA partitions the iota). Two keys' masks relate only through an
affine permutation of positions (never a shift, unless both multipliers are equal: probability
2**-31). Positions are taken modulo 2**32: masks of more elements (DC5's encoder attention for a
global batch over 37 images at 800x1216) repeat after 2**32 elements, across different images.
"""

import functools

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
  row-major position i.

  Built axis by axis from the front: the index of the leading axes, computed on their own
  smaller shape with the multiplier times the last axis's length, plus the last axis's
  ``iota * multiplier``, each broadcast. Only that one add runs over the full shape: an element
  costs one operation for its position, not a multiply and an add per axis (XLA counts each as a
  FLOP).
  """
  if not shape:
    return offset
  last = shape[-1]
  leading = _affine_index(shape[:-1], multiplier * jnp.uint32(last % _LEVELS), offset)
  column = lax.broadcasted_iota(jnp.uint32, (last,), 0) * multiplier
  return leading[..., None] + column


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


def scale_kept(x: jax.Array, rate: float) -> jax.Array:
  """``x / (1 - rate)``, the kept values' scale. A float32 x is divided as flax divides; a
  lower-precision x in float32, rounded once: in bf16 arithmetic the divisor would be bf16's
  rounding of 1 - rate (0.9 -> 0.8984375, 0.17% small: some kept values round one step high),
  and on TPUs without bf16 vector arithmetic XLA converts that constant for every element (a FLOP
  each, by its count)."""
  if jnp.finfo(x.dtype).bits >= 32:
    return x / (1.0 - rate)
  return (x.astype(jnp.float32) / (1.0 - rate)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def relu_dropout(x: jax.Array, keep: jax.Array, rate: float, scaled: bool) -> jax.Array:
  """``where(keep, relu(x) / (1 - rate), 0)``, the feed-forward's ReLU and dropout, whose backward
  pass keeps only the output y and draws no mask: ``y > 0`` is exactly "x > 0 and kept" (a
  positive x over 1 - rate stays positive), so the gradient is ``where(y > 0, g / (1 - rate), 0)``
  (``scale_kept``), what autodiff gives. Autodiff of the two ops keeps x (or the ReLU), and XLA
  evaluated the hashed mask twice more in the backward pass: once for the next layer's weight
  gradient (which reads y) and once for x's gradient.

  Args:
    x: the pre-activation.
    keep: the keep mask (``keep_mask``), x's shape.
    rate: the drop probability, in (0, 1).
    scaled: False leaves the kept values (and their gradient) unscaled, ``where(keep, relu(x),
      0)``, for a caller that applies ``1 / (1 - rate)`` after a linear map, where it costs fewer
      operations (``Dropout.after_relu``).
  """
  # The ReLU in float32 beside the scale's conversion (bf16 max costs two more on v5e).
  relu = jnp.maximum(x.astype(jnp.float32), 0.0)
  if scaled:
    relu = scale_kept(relu, rate)
  return jnp.where(keep, relu.astype(x.dtype), jnp.zeros_like(x))


def _relu_dropout_fwd(
  x: jax.Array, keep: jax.Array, rate: float, scaled: bool
) -> tuple[jax.Array, jax.Array]:
  y = relu_dropout(x, keep, rate, scaled)
  return y, y


def _relu_dropout_bwd(
  rate: float, scaled: bool, y: jax.Array, g: jax.Array
) -> tuple[jax.Array, None]:
  kept = y.astype(jnp.float32) > 0
  if scaled:
    g = scale_kept(g.astype(jnp.float32), rate).astype(g.dtype)
  return jnp.where(kept, g, jnp.zeros_like(g)), None


relu_dropout.defvjp(_relu_dropout_fwd, _relu_dropout_bwd)


class Dropout(nn.Module):
  """``nn.Dropout``'s interface (``rate``, ``deterministic``, ``rng_collection``) with masks from
  ``keep_mask``.

  Named ``Dropout`` as flax's, so the modules' automatic names, and with them the dropout keys each
  derives from the ``dropout`` collection, stay those of ``nn.Dropout``.
  """

  rate: float
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  def keep(self, shape: tuple[int, ...]) -> jax.Array:
    """This module's keep mask for an input of ``shape`` (``keep_mask`` of a key from
    ``rng_collection``), for a caller that applies it fused with its neighbour's backward pass
    (``relu_dropout``, the attention's ``dropped_attention``)."""
    return keep_mask(self.make_rng(self.rng_collection), shape, self.rate)

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
    keep = self.keep(inputs.shape) if rng is None else keep_mask(rng, inputs.shape, self.rate)
    return jnp.where(keep, scale_kept(inputs, self.rate), jnp.zeros_like(inputs))

  def after_relu(
    self, x: jax.Array, deterministic: bool | None = None, defer_scale: bool = False
  ) -> tuple[jax.Array, float]:
    """``(y, scale)`` with ``y * scale`` equal to ``self(relu(x))``: computed by ``relu_dropout``
    when it drops (rate strictly between 0 and 1), the same values and gradients, one tensor kept
    for the backward pass and no mask drawn there.

    ``scale`` is 1 unless ``defer_scale`` and a drop happen: then y holds the kept values unscaled
    and ``scale`` is ``1 / (1 - rate)``, for the caller to apply after its next linear map (the
    feed-forward's linear2: 256 outputs per token to scale instead of 2048 inputs, in the forward
    and the backward pass). The product then rounds differently, so float32 callers keep the
    default, flax's values.
    """
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or not 0.0 < self.rate < 1.0:
      return self(nn.relu(x), deterministic=deterministic), 1.0
    y = relu_dropout(x, self.keep(x.shape), self.rate, not defer_scale)
    return y, 1.0 / (1.0 - self.rate) if defer_scale else 1.0
