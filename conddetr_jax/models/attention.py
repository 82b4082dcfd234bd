"""Multi-head attention whose inputs are already projected (the original's ``attention.py``).

Conditional DETR projects queries, keys and values outside the attention (content and position
separately), and its cross-attention has query/key width 2*d but value width d. This module is
the remaining part: split heads, scaled dot product, key padding mask, softmax in float32,
attention dropout, merge heads, output projection.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conddetr_jax.models import initializers


class MultiHeadAttention(nn.Module):
  """Attention over pre-projected q, k, v with an output projection ``out_proj`` (d_v -> d_v).

  The scale is ``(d_qk / num_heads) ** -0.5`` as in the original (head dim 64 in the decoder's
  cross-attention, whose queries are [content, spatial] concatenations, and 32 elsewhere).
  """
  num_heads: int
  dropout: float = 0.0
  # True: project q, k, v first (``q_proj``, ``k_proj``, ``v_proj``), i.e. torch's
  # nn.MultiheadAttention, used by the encoder and the DETR baseline decoder.
  in_proj: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               key_padding_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    """query (B, Lq, Dqk), key (B, Lk, Dqk), value (B, Lk, Dv), key_padding_mask (B, Lk) True on
    padding -> (B, Lq, Dv)."""
    if self.in_proj:
      # xavier over torch's packed (3d, d) in_proj_weight; zero in_proj_bias.
      proj = lambda name, width: nn.Dense(width, dtype=self.dtype, name=name,
                                          kernel_init=initializers.packed_xavier_uniform(3),
                                          bias_init=nn.initializers.zeros)
      query = proj("q_proj", query.shape[-1])(query)
      key = proj("k_proj", key.shape[-1])(key)
      value = proj("v_proj", value.shape[-1])(value)
    batch, len_q, d_qk = query.shape
    d_v = value.shape[-1]
    h = self.num_heads
    if d_qk % h or d_v % h:
      raise ValueError(f"widths q/k={d_qk}, v={d_v} must be divisible by num_heads={h}")
    q = query.reshape(batch, len_q, h, d_qk // h) * (d_qk // h) ** -0.5
    k = key.reshape(batch, key.shape[1], h, d_qk // h)
    v = value.reshape(batch, value.shape[1], h, d_v // h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if key_padding_mask is not None:
      logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, len_q, d_v)
    # The original's out_proj: xavier weight (Transformer._reset_parameters), zero bias.
    return nn.Dense(d_v, dtype=self.dtype, kernel_init=initializers.xavier_uniform,
                    bias_init=nn.initializers.zeros, name="out_proj")(out)
