"""The ResNet stem's 3x3 stride-2 max-pool, with a backward that XLA:CPU runs cheaply.

``flax.linen.max_pool``'s gradient is XLA's select-and-scatter, which XLA:CPU rewrites into a
variadic reduce-window that carries four int32 index tensors (one iota per input axis) next to the
values, then a scatter: on the demo's train step (ResNet-18 trained whole, 4 x 160x192) that was
about a tenth of the step (docs/cpu-step.md). Here the pool is the maximum of its nine strided
window taps, and the backward hands each output's gradient to the tap that won, found again from an
int32 tap index saved in the forward. Ties go to the first maximum in row-major window order, as
PyTorch's max_pool2d and XLA's select-and-scatter both do, so values and gradients are those of
``nn.max_pool`` and PyTorch's (tests/test_backbone_ops.py checks both against PyTorch, ties
included).

Differentiated and compiled for TPU, the forward is XLA's reduce-window and the tap index is found
by comparing the taps with its result: in the train step the stem is frozen, nothing reads the
index, XLA drops it, and the pool is one reduce-window (XLA:TPU materialises the nine strided taps:
R50 bf16 on v5e, 0.31 GB per image; docs/accelerators.md). XLA:CPU keeps the taps (its
reduce-window made the demo-sized pool's forward and backward 4x slower). Undifferentiated
(evaluation, serving), the pool is the taps' maximum on every platform: jax2onnx turns a
reduce-window into an NHWC MaxPool that onnxruntime rejects, and cannot convert a platform switch.
"""

import functools

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


def _taps_max_and_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, index of the first tap holding it), from the taps alone."""
  taps, _ = _taps(x)
  best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int32)
  for k, tap in enumerate(taps[1:], start=1):
    better = tap > best
    best, index = jnp.where(better, tap, best), jnp.where(better, k, index)
  return best, index


def _reduce_window_max_and_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max, index of the first tap holding it): XLA's reduce-window, then the taps compared with
  its result (XLA drops that comparison when nothing reads the index)."""
  best = lax.reduce_window(
    x,
    -jnp.inf,
    lax.max,
    (1, _WINDOW, _WINDOW, 1),
    (1, _STRIDE, _STRIDE, 1),
    ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)),
  )
  taps, _ = _taps(x)
  index = jnp.zeros(best.shape, jnp.int32)
  for k in reversed(range(len(taps))):  # the lowest k holding the maximum is written last
    index = jnp.where(taps[k] == best, k, index)
  return best, index


@jax.custom_vjp
def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C): torchvision's stem
  max-pool (kernel 3, stride 2, padding 1; the padding never wins)."""
  return _taps_max_and_index(x)[0]  # XLA drops the unread index


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple[int, ...]]]:
  best, index = lax.platform_dependent(
    x, tpu=_reduce_window_max_and_index, default=_taps_max_and_index
  )
  return best, (index, x.shape)


def _max_pool_bwd(residuals: tuple[jax.Array, tuple[int, ...]], g: jax.Array) -> tuple[jax.Array]:
  index, (_, h, w, _) = residuals
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
  return (grad[:, _PAD : _PAD + h, _PAD : _PAD + w, :],)


max_pool_3x3_stride2.defvjp(_max_pool_fwd, _max_pool_bwd)
