"""Multi-head attention whose inputs are already projected (the original's ``attention.py``).

Conditional DETR projects queries, keys and values outside the attention (content and position
separately), and its cross-attention has query/key width 2*d but value width d. This module is
the remaining part: split heads, scaled dot product, key padding mask, softmax in float32 (its
output, and what the backward pass keeps of it, in the compute dtype), attention dropout,
merge heads, output projection.

Two implementations of the scaled dot product (``MultiHeadAttention.implementation``):
- ``dense``: the original's, materialising the (B, heads, Lq, Lk) logits, weights and dropout mask
  (and keeping them for the backward pass);
- ``blockwise``: ``blockwise_attention``, a scan over blocks of keys with a running softmax
  (Rabe & Staats, "Self-attention does not need O(n^2) memory", 2021; the forward of
  FlashAttention), whose memory grows with Lq * block_size instead of Lq * Lk, forward and backward.
Both handle query/key and value widths that differ (the decoder's cross-attention: 64 and 32 per
head), so every attention of the model can use either.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conddetr_jax.models import dropout as dropout_lib
from conddetr_jax.models import initializers

IMPLEMENTATIONS = ("dense", "blockwise")


def block_keep_mask(
  rng: jax.Array, block: jax.Array | int, shape: tuple[int, ...], rate: float
) -> jax.Array:
  """The attention-dropout keep mask (True = kept, probability 1 - rate) of key block ``block``.

  Each block draws from its own key ``fold_in(rng, block)``, so a block's mask can be drawn (and
  redrawn identically in the backward pass) without the others. ``shape`` is (B, heads, Lq,
  block_size).
  """
  return dropout_lib.keep_mask(jax.random.fold_in(rng, block), shape, rate)


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  key_padding_mask: jax.Array | None,
  block_size: int,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """softmax(q k^T) v over blocks of ``block_size`` keys, with a running max and sum in float32.

  Equal to the dense attention (``where(mask, finfo.min, logits)``, softmax, dropout of the
  normalised weights, times v): for the keys of block j the unnormalised weights are
  p = exp(s - m_j), m_j the running row max; the output accumulates sum(keep * p / (1 - rate) * v)
  and the normaliser sum(p) (the *undropped* weights), both rescaled by exp(m_old - m_new) when
  the max grows, and divides at the end. Dropping p before normalising by the undropped sum is
  dropping the normalised weights (keep * p / L = keep * (p / L)), so given the same keep masks the
  result is the dense one up to rounding. Keys beyond Lk (the last block's padding) get weight 0;
  a query whose keys are all masked gets the dense path's uniform weights over its Lk keys.

  Each scan step is checkpointed: the backward pass recomputes a block's logits and dropout mask
  from the step's inputs, so neither the forward nor the backward holds more than one
  (B, heads, Lq, block_size) block of weights.

  Args:
    q: (B, Lq, heads, Dqk), already scaled.
    k: (B, Lk, heads, Dqk).
    v: (B, Lk, heads, Dv).
    key_padding_mask: (B, Lk) True on padding, or None.
    block_size: keys per block (the last block is padded).
    dropout_rate: attention dropout on the normalised weights (0 = none).
    dropout_rng: the PRNG key of the masks (``block_keep_mask``); needed when dropout_rate > 0.

  Returns:
    (B, Lq, heads, Dv) in v's dtype.
  """
  batch, len_q, heads, _ = q.shape
  len_k, d_v = k.shape[1], v.shape[-1]
  block = min(block_size, len_k)
  num_blocks = -(-len_k // block)
  extra = num_blocks * block - len_k
  if key_padding_mask is None:
    key_padding_mask = jnp.zeros((batch, len_k), bool)

  def blocks(x: jax.Array) -> jax.Array:  # (B, Lk, ...) -> (num_blocks, B, block, ...)
    x = jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((batch, num_blocks, block) + x.shape[2:]), 1, 0)

  # Keys past Lk are excluded outright (-inf), unlike padded keys (finfo.min, as the dense path).
  outside = (jnp.arange(num_blocks * block) >= len_k).reshape(num_blocks, block)

  def step(
    carry: tuple[jax.Array, jax.Array, jax.Array], xs: tuple[jax.Array, ...]
  ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
    row_max, row_sum, acc = carry  # (B, h, Lq), (B, h, Lq), (B, h, Lq, Dv), float32
    index, k_j, v_j, padded_j, outside_j = xs
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_j, preferred_element_type=jnp.float32)
    s = jnp.where(padded_j[:, None, None, :], jnp.finfo(jnp.float32).min, s)
    s = jnp.where(outside_j, -jnp.inf, s)
    new_max = jnp.maximum(row_max, s.max(axis=-1))
    rescale = jnp.exp(row_max - new_max)
    p = jnp.exp(s - new_max[..., None])
    row_sum = row_sum * rescale + p.sum(axis=-1)
    if dropout_rate > 0.0:
      keep = block_keep_mask(dropout_rng, index, p.shape, dropout_rate)
      p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    acc = acc * rescale[..., None] + jnp.einsum(
      "bhqk,bkhd->bhqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32
    )
    return (new_max, row_sum, acc), None

  init = (
    jnp.full((batch, heads, len_q), -jnp.inf, jnp.float32),
    jnp.zeros((batch, heads, len_q), jnp.float32),
    jnp.zeros((batch, heads, len_q, d_v), jnp.float32),
  )
  xs = (jnp.arange(num_blocks), blocks(k), blocks(v), blocks(key_padding_mask), outside)
  (_, row_sum, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, xs)
  return jnp.moveaxis(acc / row_sum[..., None], 1, 2).astype(v.dtype)


def head_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Per-head dot products: q (B, Lq, heads, D), already scaled; k (B, Lk, heads, D) ->
  (B, heads, Lq, Lk) float32, the product's own accumulator (``preferred_element_type``): under
  bf16 compute no bf16 rounding of the logits and no float32 copy of them. Compiled for v5e (R50,
  2 images per chip) this moves fewer bytes than bf16 logits cast for the softmax: encoder
  5.29 -> 4.33 GB, decoder 2.97 -> 2.57 GB per chip, fewer FLOPs too (docs/accelerators.md)."""
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_as(logits: jax.Array, dtype: Any) -> jax.Array:
  """``jax.nn.softmax`` over the last axis of float32 ``logits``, returned in ``dtype``; the
  backward pass keeps only that output, so under bf16 compute the (B, heads, Lq, Lk) weights are
  stored for it in bf16 rather than float32 (half the memory traffic of the largest tensors of the
  transformer). The gradient is softmax's, y * (g - sum(y * g)), computed in float32 from the kept
  y (``masked_softmax`` uses ``jax.nn.softmax`` itself in float32)."""
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _softmax_as_fwd(logits: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  weights = softmax_as(logits, dtype)
  return weights, weights


def _softmax_grad(y: jax.Array, grad: jax.Array) -> jax.Array:
  """softmax's vector-Jacobian product from its float32 output y: y * (g - sum(y * g))."""
  g = grad.astype(jnp.float32)
  return y * (g - (y * g).sum(axis=-1, keepdims=True))


def _softmax_as_bwd(dtype: Any, weights: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
  del dtype
  return (_softmax_grad(weights.astype(jnp.float32), grad),)


softmax_as.defvjp(_softmax_as_fwd, _softmax_as_bwd)


def _padding_masked(logits: jax.Array, key_padding_mask: jax.Array | None) -> jax.Array:
  """Float32 logits with the padded keys (``key_padding_mask`` (B, Lk) True on padding) at their
  dtype's finfo.min, so that the softmax gives them weight 0."""
  if key_padding_mask is not None:
    logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(logits.dtype).min, logits)
  return logits.astype(jnp.float32)


def masked_softmax(
  logits: jax.Array, key_padding_mask: jax.Array | None, dtype: Any = jnp.float32
) -> jax.Array:
  """Softmax over the last axis of (B, heads, Lq, Lk) logits with the padded keys
  (``key_padding_mask`` (B, Lk) True on padding) at their dtype's finfo.min, so that they get
  weight 0; computed in float32 (the cast fuses into the softmax's reads), returned (and kept for
  the backward pass) in ``dtype`` (``softmax_as``)."""
  logits = _padding_masked(logits, key_padding_mask)
  if jnp.dtype(dtype) == jnp.float32:  # float32 results stay jax.nn.softmax's, bit for bit
    return jax.nn.softmax(logits, axis=-1)
  return softmax_as(logits, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dropped_attention(logits: jax.Array, keep: jax.Array, v: jax.Array, rate: float) -> jax.Array:
  """``dropped_attention`` of padding-masked float32 logits; the weights in v's dtype. The forward
  rule's values, differentiated or not."""
  return _dropped_attention_fwd(logits, keep, v, rate)[0]


def _kept_weights(signed: jax.Array) -> jax.Array:
  """The kept weights, unscaled, from the signed ones (kept >= 0, dropped < 0): exact."""
  return jnp.maximum(signed.astype(jnp.float32), 0.0).astype(signed.dtype)


def _dropped_attention_fwd(
  logits: jax.Array, keep: jax.Array, v: jax.Array, rate: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  weights = jax.nn.softmax(logits, axis=-1)
  # Signed in float32 and rounded once (rounding is symmetric: the rounded weights, signed). The
  # barrier makes XLA write them once: left to itself, it recomputes them, and the mask's hash,
  # inside every fusion that reads them, forward and backward.
  signed = jax.lax.optimization_barrier(jnp.where(keep, weights, -weights).astype(v.dtype))
  # 1 / (1 - rate) on the (B, Lq, heads, Dv) product rather than on each of the Lk weights.
  out = jnp.einsum("bhqk,bkhd->bqhd", _kept_weights(signed), v, preferred_element_type=jnp.float32)
  out = dropout_lib.scale_kept(out, rate)
  return out.astype(v.dtype), (signed, v, out)


def _dropped_attention_bwd(
  rate: float, residuals: tuple[jax.Array, jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, None, jax.Array]:
  signed, v, out = residuals
  scaled_grad = dropout_lib.scale_kept(grad, rate)  # the dropout's scale, on the small side
  v_grad = jnp.einsum("bhqk,bqhd->bkhd", _kept_weights(signed), scaled_grad)
  weights_grad = jnp.einsum("bqhd,bkhd->bhqk", scaled_grad, v).astype(jnp.float32)
  # The softmax's sum(y * g) over the keys is the output times its cotangent (FlashAttention's
  # D): (B, Lq, heads) numbers from (B, Lq, heads, Dv) ones, not a pass over (B, heads, Lq, Lk).
  row = jnp.einsum("bqhd,bqhd->bhq", grad.astype(jnp.float32), out)[..., None]
  # softmax's y * (g - row), g the dropout's cotangent (0 where dropped): with y = |signed|,
  # signed * (g - row) where kept and signed * row where dropped (signed = -y there).
  signed = signed.astype(jnp.float32)
  logits_grad = signed * jnp.where(signed > 0, weights_grad - row, row)
  return logits_grad, None, v_grad


_dropped_attention.defvjp(_dropped_attention_fwd, _dropped_attention_bwd)


def dropped_attention(
  logits: jax.Array,
  key_padding_mask: jax.Array | None,
  keep: jax.Array,
  v: jax.Array,
  rate: float,
) -> jax.Array:
  """softmax(logits) with attention dropout, times v: the dense attention's last part under a
  low-precision compute dtype, with a backward rule that keeps one (B, heads, Lq, Lk) tensor and
  computes no mask.

  The kept tensor is the weights (rounded to v's dtype) with the dropped ones negated: weights are
  never negative, so the sign bit holds the mask (a weight of 0 loses it, but a weight of 0 has no
  gradient either way). Autodiff of softmax, dropout and product keeps the weights, and XLA
  evaluated the hashed mask twice more in the backward pass (for v's gradient and the weights');
  and it reduced over (B, heads, Lq, Lk) for the softmax's sum(y * g), which the output and its
  cotangent give here. The dropout's 1 / (1 - rate) scales the product and the incoming cotangent
  (Dv values per head) rather than the Lk weights. Values and gradients: those of ``Dropout``
  after ``masked_softmax`` and the product, up to rounding (docs/accelerators.md, fifth round).

  Args:
    logits: (B, heads, Lq, Lk), float32 or v's dtype.
    key_padding_mask: (B, Lk) True on padding, or None.
    keep: the keep mask (``dropout.keep_mask``), logits' shape.
    v: (B, Lk, heads, Dv).
    rate: the drop probability, in (0, 1).

  Returns:
    (B, Lq, heads, Dv) in v's dtype.
  """
  return _dropped_attention(_padding_masked(logits, key_padding_mask), keep, v, rate)


class MultiHeadAttention(nn.Module):
  """Attention over pre-projected q, k, v with an output projection ``out_proj`` (d_v -> d_v).

  The scale is ``(d_qk / num_heads) ** -0.5`` as in the original (head dim 64 in the decoder's
  cross-attention, whose queries are [content, spatial] concatenations, and 32 elsewhere).
  ``implementation`` is one of ``IMPLEMENTATIONS`` (module docstring); ``block_size`` the keys per
  block of ``blockwise``. The two draw their attention-dropout masks differently (one draw of the
  whole (B, heads, Lq, Lk) mask, as the original, or one per key block), with the same
  distribution.
  """

  num_heads: int
  dropout: float = 0.0
  # True: project q, k, v first (``q_proj``, ``k_proj``, ``v_proj``), i.e. torch's
  # nn.MultiheadAttention, used by the encoder and the DETR baseline decoder.
  in_proj: bool = False
  dtype: Any = jnp.float32
  implementation: str = "dense"
  block_size: int = 512
  # True: sow the (B, heads, Lq, Lk) float32 ``logits`` (before the padding mask) and ``weights``
  # (the softmax, before dropout) into ``intermediates``; only the dense implementation has them.
  record: bool = False

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_padding_mask: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """query (B, Lq, Dqk), key (B, Lk, Dqk), value (B, Lk, Dv), key_padding_mask (B, Lk) True on
    padding -> (B, Lq, Dv)."""
    if self.in_proj:
      # xavier over torch's packed (3d, d) in_proj_weight; zero in_proj_bias.
      proj = lambda name, width: nn.Dense(
        width,
        dtype=self.dtype,
        name=name,
        kernel_init=initializers.packed_xavier_uniform(3),
        bias_init=nn.initializers.zeros,
      )
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
    if self.implementation == "blockwise":
      dropping = train and self.dropout > 0.0
      out = blockwise_attention(
        q,
        k,
        v,
        key_padding_mask,
        self.block_size,
        self.dropout if dropping else 0.0,
        self.make_rng("dropout") if dropping else None,
      )
    else:
      logits = head_logits(q, k)
      dropout = dropout_lib.Dropout(self.dropout)
      if train and 0.0 < self.dropout < 1.0 and not self.record and self.dtype != jnp.float32:
        # Softmax, dropout and product with one backward rule (``dropped_attention``); float32
        # keeps jax.nn.softmax's autodiff, bit for bit.
        keep = dropout.keep(logits.shape)
        out = dropped_attention(logits, key_padding_mask, keep, v.astype(self.dtype), self.dropout)
      else:
        # The weights in the compute dtype from here on (dropout included); float32 where sown.
        dtype = jnp.float32 if self.record else self.dtype
        weights = masked_softmax(logits, key_padding_mask, dtype)
        if self.record:
          self.sow("intermediates", "logits", logits)
          self.sow("intermediates", "weights", weights)
        weights = dropout(weights, deterministic=not train).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = out.reshape(batch, len_q, d_v)
    # The original's out_proj: xavier weight (Transformer._reset_parameters), zero bias.
    return nn.Dense(
      d_v,
      dtype=self.dtype,
      kernel_init=initializers.xavier_uniform,
      bias_init=nn.initializers.zeros,
      name="out_proj",
    )(out)
