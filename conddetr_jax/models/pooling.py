"""The ResNet stem's 3x3 stride-2 max-pool: XLA's reduce-window forward, and a backward that
XLA:CPU runs cheaply.

On CPU, the reduce-window's gradient is XLA's select-and-scatter, which XLA:CPU rewrites into a
variadic reduce-window that carries four int32 index tensors (one iota per input axis) next to the
values, then a scatter: on the demo's train step (ResNet-18 trained whole, 4 x 160x192) that was
about a tenth of the step (docs/cpu-step.md). There the backward finds the tap that won among the
pool's nine strided window taps and hands it the output's gradient.

Programs compiled for TPUs and GPUs keep select-and-scatter (``lax.platform_dependent`` follows the
compile target, as ``convolution`` does). The forward is the reduce-window everywhere: computing
the nine taps as the forward did on every platform cost TPU nine strided copies of the padded stem
output (R50 bf16 backbone on v5e, 2 x 800x1216 per chip: 13.78 -> 13.17 GB with the reduce-window,
docs/accelerators.md), and the forward used for inference and exports holds no platform switch
(ONNX has none).

Either way ties go to the first maximum in row-major window order, as PyTorch's max_pool2d and
XLA's select-and-scatter both do, so values and gradients are PyTorch's (tests/test_backbone_ops.py
checks both backward forms against PyTorch, ties included, and which form each platform compiles).
"""

import jax
from jax import lax
import jax.numpy as jnp

_WINDOW, _STRIDE, _PAD = 3, 2, 1


def _taps(x: jax.Array) -> tuple[list[jax.Array], tuple[int, int]]:
  """The nine strided (B, Ho, Wo, C) views of ``x`` padded with -inf, in row-major window order."""
  _, h, w, _ = x.shape
  out_h, out_w = (h + 2 * _PAD - _WINDOW) // _STRIDE + 1, (w + 2 * _PAD - _WINDOW) // _STRIDE + 1
  padded = jnp.pad(x, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)), constant_values=-jnp.inf)
  taps = [
    lax.slice(
      padded,
      (0, i, j, 0),
      (x.shape[0], i + _STRIDE * (out_h - 1) + 1, j + _STRIDE * (out_w - 1) + 1, x.shape[3]),
      (1, _STRIDE, _STRIDE, 1),
    )
    for i in range(_WINDOW)
    for j in range(_WINDOW)
  ]
  return taps, (out_h, out_w)


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, index of the first tap holding it)."""
  taps, _ = _taps(x)
  best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int32)
  for k, tap in enumerate(taps[1:], start=1):
    better = tap > best
    best, index = jnp.where(better, tap, best), jnp.where(better, k, index)
  return best, index


@jax.custom_vjp
def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C): torchvision's stem
  max-pool (kernel 3, stride 2, padding 1; the padding never wins). The forward is XLA's
  reduce-window on every platform (so inference and exports hold no platform switch); the
  backward is the taps' on CPU, select-and-scatter elsewhere (module docstring)."""
  return window_max_pool(x)


def window_max_pool(x: jax.Array) -> jax.Array:
  """``max_pool_3x3_stride2`` as one reduce-window (its gradient: XLA's select-and-scatter)."""
  pad = ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0))
  window, strides = (1, _WINDOW, _WINDOW, 1), (1, _STRIDE, _STRIDE, 1)
  return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pad)


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return window_max_pool(x), x


def _max_pool_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (lax.platform_dependent(x, g, cpu=tap_backward, default=window_backward),)


def window_backward(x: jax.Array, g: jax.Array) -> jax.Array:
  """The pool's input gradient by XLA's select-and-scatter (TPU, GPU)."""
  return jax.vjp(window_max_pool, x)[1](g)[0]


def tap_backward(x: jax.Array, g: jax.Array) -> jax.Array:
  """The pool's input gradient on CPU: each output's gradient goes to the tap that won (the
  first maximum in row-major window order), placed back at its strided input positions."""
  _, index = _forward(x)
  _, h, w, _ = x.shape
  out_h, out_w = g.shape[1:3]
  padded_h, padded_w = h + 2 * _PAD, w + 2 * _PAD
  zero = jnp.zeros((), g.dtype)
  grad = None
  for k in range(_WINDOW * _WINDOW):
    i, j = divmod(k, _WINDOW)
    # Place tap k's share back at its strided input positions (interior padding = stride - 1).
    share = lax.pad(
      jnp.where(index == k, g, zero),
      zero,
      (
        (0, 0, 0),
        (i, padded_h - i - _STRIDE * (out_h - 1) - 1, _STRIDE - 1),
        (j, padded_w - j - _STRIDE * (out_w - 1) - 1, _STRIDE - 1),
        (0, 0, 0),
      ),
    )
    grad = share if grad is None else grad + share
  return grad[:, _PAD : _PAD + h, _PAD : _PAD + w, :]


max_pool_3x3_stride2.defvjp(_max_pool_fwd, _max_pool_bwd)
