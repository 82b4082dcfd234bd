"""``lax.conv_general_dilated`` with 1x1 convolutions computed as products on CPU and TPU.

A 1x1 convolution is a product over the channel axis. Computing it as one is cheaper on two of
the three platforms, each for its own reason:

- XLA:CPU runs the backward of a 1x1 *convolution* as two more convolutions: the weight gradient
  contracts over batch and space, which it sets up by transposing the activations and the output
  gradient to (C, H, W, B) copies first (about 40% of the R50 step's thread time at 2 x 384x512).
  As one 2-D matrix product over the flattened (B*H*W, C) activation the step runs 1.45x faster
  (docs/cpu-step.md).
- XLA:TPU keeps a 1x1 convolution's operands and results in convolution layouts and copies
  between those and the layouts of the elementwise code around it; a ``dot_general`` over the
  channel axis of the 4-D activation fuses with its neighbours instead. Flattening is not free
  there: the (B*H*W, C) reshape is a relayout copy (DC5-R50's bf16 train step needed 19.0 instead
  of 13.3 GiB of temporaries on a v5e chip). Compiled for v5e, the R50 bf16 backbone's forward and
  backward move 22% fewer bytes with the 4-D product than with the convolution (17.6 -> 13.8 GB
  per chip for 2 images at 800x1216, docs/accelerators.md).
- GPUs keep the convolution: cuDNN runs it well.

The result is the same sum in another order: equal to float32 rounding (tests/test_backbone_ops.py
checks output and gradients against PyTorch's conv2d, and which form each platform compiles).

Pass ``conv_general_dilated`` to ``flax.linen.Conv``: parameters, names and initialisation stay
those of ``nn.Conv``, so checkpoints do not change.
"""

import functools
from typing import Any, Sequence

import jax
from jax import lax

_CHANNELS_LAST = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _is_pointwise(
  kernel: jax.Array,
  padding: Any,
  lhs_dilation: Sequence[int] | None,
  dimension_numbers: Any,
  feature_group_count: int,
) -> bool:
  """Whether the conv is a plain 1x1 NHWC/HWIO conv (any stride, no padding, groups or dilation)."""
  return (
    kernel.ndim == 4
    and kernel.shape[:2] == (1, 1)
    and dimension_numbers == _CHANNELS_LAST
    and feature_group_count == 1
    and not isinstance(padding, str)
    and all(tuple(p) == (0, 0) for p in padding)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
  )


def conv_general_dilated(
  inputs: jax.Array,
  kernel: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  precision: Any = None,
  **kwargs: Any,
) -> jax.Array:
  """``lax.conv_general_dilated``, except that on CPU and TPU a 1x1 conv is a product.

  inputs (B, H, W, Cin), kernel (1, 1, Cin, Cout) -> (B, ceil(H / sh), ceil(W / sw), Cout) for the
  1x1 case (a strided 1x1 conv reads every stride-th pixel, as the conv does); anything else goes
  to ``lax.conv_general_dilated`` unchanged. ``rhs_dilation`` does not matter for a 1x1 kernel.
  """

  def as_convolution(x: jax.Array, k: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
      x,
      k,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )

  if kwargs or not _is_pointwise(
    kernel, padding, lhs_dilation, dimension_numbers, feature_group_count
  ):
    return as_convolution(inputs, kernel)
  # The choice follows the compile target, so an ahead-of-time compile for TPU on a CPU host gets
  # the TPU form (see the module docstring for why each platform gets its own).
  product = functools.partial(pointwise_product, window_strides=window_strides, precision=precision)
  return lax.platform_dependent(
    inputs,
    kernel,
    cpu=functools.partial(product, flatten=True),
    tpu=functools.partial(product, flatten=False),
    default=as_convolution,
  )


def pointwise_product(
  inputs: jax.Array,
  kernel: jax.Array,
  window_strides: Sequence[int],
  precision: Any,
  flatten: bool,
) -> jax.Array:
  """A 1x1 conv as a product over the channel axis: (B, H, W, Cin) x (1, 1, Cin, Cout).

  ``flatten=True`` computes one (B*H*W, Cin) @ (Cin, Cout) matrix product, whose weight gradient
  is a plain 2-D product too (what XLA:CPU runs fastest); ``flatten=False`` contracts the channel
  axis of the 4-D activation directly (no reshape, which on TPU is a relayout copy). A strided
  1x1 conv reads every stride-th pixel.
  """
  sh, sw = window_strides
  if (sh, sw) != (1, 1):
    inputs = inputs[:, ::sh, ::sw, :]
  weights = kernel[0, 0]
  if not flatten:
    return lax.dot_general(inputs, weights, (((3,), (0,)), ((), ())), precision=precision)
  batch_shape = inputs.shape[:3]
  out = lax.dot(inputs.reshape(-1, inputs.shape[3]), weights, precision=precision)
  return out.reshape(batch_shape + (kernel.shape[3],))
