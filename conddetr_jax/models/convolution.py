"""``lax.conv_general_dilated`` with 1x1 convolutions computed as matrix products on CPU.

A 1x1 convolution is a matrix product over the channel axis, but XLA:CPU runs the backward of a
1x1 *convolution* as two more convolutions: the weight gradient contracts over batch and space,
which it sets up by transposing both the activations and the output gradient to (C, H, W, B)
copies first. Profiled on the R50 train step (2 x 384x512, 2 cores), those transposes and the
convolutions behind them were about 40% of the step's thread time. As one 2-D matrix product the
same contraction needs no such copy, and the R50 step runs 1.45x faster (docs/cpu-step.md). The
result is the same sum in another order: equal to float32 rounding (tests/test_backbone_ops.py
checks output and gradients against PyTorch's conv2d). Only programs compiled for CPU take this
path: on TPU it costs memory, on GPUs cuDNN runs the convolution.

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
  """``lax.conv_general_dilated``, except that on CPU a 1x1 conv is a matrix product.

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
  # Only XLA:CPU gains: on TPU the flattened (B*H*W, C) activation costs relayout copies (DC5-R50's
  # bf16 train step needed 19.0 instead of 13.3 GiB of temporaries on a v5e chip,
  # docs/accelerators.md), and GPUs have cuDNN. The choice follows the compile target, so an
  # ahead-of-time compile for TPU on a CPU host gets the convolution.
  return lax.platform_dependent(
    inputs,
    kernel,
    cpu=functools.partial(_as_matrix_product, window_strides=window_strides, precision=precision),
    default=as_convolution,
  )


def _as_matrix_product(
  inputs: jax.Array, kernel: jax.Array, window_strides: Sequence[int], precision: Any
) -> jax.Array:
  """A 1x1 conv as one (B*H*W, Cin) @ (Cin, Cout) product.

  Its weight gradient is then a plain 2-D product too, which XLA:CPU runs 1.3-2x faster than the
  same contraction over three 4-D axes. A strided 1x1 conv reads every stride-th pixel.
  """
  sh, sw = window_strides
  if (sh, sw) != (1, 1):
    inputs = inputs[:, ::sh, ::sw, :]
  batch_shape = inputs.shape[:3]
  out = lax.dot(inputs.reshape(-1, inputs.shape[3]), kernel[0, 0], precision=precision)
  return out.reshape(batch_shape + (kernel.shape[3],))
