"""Sine positional embeddings: of a padding mask (encoder) and of 2-d points (decoder queries).

Both follow the original exactly: float32, ``dim_t = T ** (2 * (i // 2) / F)``, sin on even and
cos on odd feature indices interleaved, and the y features before the x features.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def downsample_mask(pad_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of a padding mask, as ``F.interpolate(mask.float(), size)``.

  PyTorch's legacy "nearest" picks source index ``floor(dst * (in / out))`` with the scale in
  float32, which is reproduced here with static (trace-time) index arrays. This matters for
  padded sizes that are not a multiple of the stride.

  Args:
    pad_mask: (B, H, W) bool, True on padding.
    size: (h, w) of the feature map.
  Returns:
    (B, h, w) bool, True on padding.
  """

  def source_index(in_size: int, out_size: int) -> np.ndarray:
    if in_size == out_size:
      return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)

  rows = source_index(pad_mask.shape[1], size[0])
  cols = source_index(pad_mask.shape[2], size[1])
  return pad_mask[:, rows][:, :, cols]


def _frequencies(num_feats: int, temperature: float) -> jax.Array:
  """(num_feats,) float32: temperature ** (2 * (i // 2) / num_feats)."""
  dim_t = jnp.arange(num_feats, dtype=jnp.float32)
  return jnp.power(jnp.float32(temperature), 2 * (dim_t // 2) / num_feats)


def _interleave_sin_cos(angles: jax.Array) -> jax.Array:
  """(..., F) angles -> (..., F): sin of even and cos of odd entries, interleaved as the
  original."""
  stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return stacked.reshape(angles.shape)


def sine_position_embedding(mask: jax.Array, num_pos_feats: int = 128) -> jax.Array:
  """The original's PositionEmbeddingSine(normalize=True) of a feature-level padding mask.

  Coordinates are the cumulative count of valid pixels, normalised by the valid extent of each
  row/column (so padding never shifts the embedding of real pixels), embedded as points are
  (``sine_embedding_of_points``).

  Args:
    mask: (B, h, w) bool, True on padding.
    num_pos_feats: features per coordinate.
  Returns:
    (B, h, w, 2 * num_pos_feats) float32, y features first.
  """
  not_mask = (~mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  eps = 1e-6
  y_embed = y_embed / (y_embed[:, -1:, :] + eps)
  x_embed = x_embed / (x_embed[:, :, -1:] + eps)
  return sine_embedding_of_points(jnp.stack([x_embed, y_embed], axis=-1), num_pos_feats)


def sine_embedding_of_points(
  points: jax.Array,
  num_pos_feats: int = 128,
  temperature: float = 10000.0,
  scale: float = 2 * math.pi,
) -> jax.Array:
  """The original's ``gen_sineembed_for_position``: sine embedding of normalised 2-d points.

  Args:
    points: (..., 2) as (x, y) in [0, 1].
  Returns:
    (..., 2 * num_pos_feats) float32, y features first.
  """
  dim_t = _frequencies(num_pos_feats, temperature)
  points = points.astype(jnp.float32) * scale
  pos_x = _interleave_sin_cos(points[..., 0, None] / dim_t)
  pos_y = _interleave_sin_cos(points[..., 1, None] / dim_t)
  return jnp.concatenate([pos_y, pos_x], axis=-1)
