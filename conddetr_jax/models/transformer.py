"""The Conditional DETR transformer: a post-norm encoder and the conditional decoder.

Sequences are batch-first: (B, L, d). Padding masks are True on padded positions. Module and
parameter names follow the original's state-dict keys (``sa_qcontent_proj``, ``ca_qpos_sine_proj``,
``query_scale``, ``ref_point_head`` ...) so checkpoint conversion is a rename.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from conddetr_jax.models import initializers
from conddetr_jax.models.attention import MultiHeadAttention, head_logits, masked_softmax
from conddetr_jax.models.dropout import Dropout
from conddetr_jax.models.position import sine_embedding_of_points

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (Flax's is 1e-6)
# What a layer's backward pass recomputes instead of keeping from the forward (``remat_layer``).
REMAT = ("none", "attention", "layer")


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm as torch's, always computed in float32 (also under bf16 compute)."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, name=name)


def _scaled_product(
  lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, scale: float, **kwargs: Any
) -> jax.Array:
  """``lax.dot_general`` times ``scale``: the product, in its dtype, multiplied in float32 and
  rounded back (bf16 arithmetic would round the scale too: ``dropout.scale_kept``)."""
  product = jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
  return (product.astype(jnp.float32) * scale).astype(product.dtype)


def linear(
  features: int,
  fan_in: int,
  name: str,
  dtype: Any,
  kernel_init: Callable[..., jax.Array] = initializers.xavier_uniform,
  product_scale: float = 1.0,
) -> nn.Dense:
  """A Linear layer initialised as the original's transformer (xavier weight, torch bias).

  ``product_scale`` multiplies the product before the bias is added (a deferred dropout scale,
  ``Dropout.after_relu``); the parameters are the same.
  """
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=kernel_init,
    bias_init=initializers.torch_default_bias(fan_in),
    dot_general=(
      None if product_scale == 1.0 else functools.partial(_scaled_product, scale=product_scale)
    ),
    name=name,
  )


class MLP(nn.Module):
  """``num_layers`` Linear layers with ReLU in between (the original's ``MLP``; params
  ``layers_i``)."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = initializers.xavier_uniform
  last_layer_zero: bool = False  # the box head's last layer starts at zero

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., d_in) -> (..., output_dim)."""
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      features = self.output_dim if last else self.hidden_dim
      if last and self.last_layer_zero:
        x = nn.Dense(
          features,
          dtype=self.dtype,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.zeros,
          name=f"layers_{i}",
        )(x)
      else:
        x = linear(features, x.shape[-1], f"layers_{i}", self.dtype, self.kernel_init)(x)
      if not last:
        x = nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """What every layer and stack of the transformer takes, as one object (flax's wmt example).

  ``attention`` is one of ``attention.IMPLEMENTATIONS`` (``attention_block_size`` keys per block of
  the blockwise one), ``remat`` one of ``REMAT``; ``deterministic`` turns dropout off (the detector
  sets it from ``train``). The detector builds it from ``config.model``, whose fields declare the
  defaults.
  """

  d_model: int
  nhead: int
  dim_feedforward: int
  dropout: float
  dtype: Any
  attention: str
  attention_block_size: int
  remat: str
  deterministic: bool = True

  def attend(self, name: str, in_proj: bool = False, record: bool = False) -> MultiHeadAttention:
    """An attention submodule ``name`` of the layer being built (see ``MultiHeadAttention``);
    ``record`` sows its logits and weights, which only the dense implementation materialises, so
    it runs dense then."""
    return MultiHeadAttention(
      self.nhead,
      self.dropout,
      in_proj=in_proj,
      dtype=self.dtype,
      implementation="dense" if record else self.attention,
      block_size=self.attention_block_size,
      record=record,
      name=name,
    )

  def drop(self, x: jax.Array) -> jax.Array:
    """The layers' residual dropout (identity when ``deterministic``)."""
    return Dropout(self.dropout)(x, deterministic=self.deterministic)

  def add_and_norm(self, x: jax.Array, update: jax.Array, norm: str) -> jax.Array:
    """A post-norm residual: the LayerNorm ``norm`` of ``x`` plus the dropped-out ``update``."""
    return layer_norm(norm)(x + self.drop(update))

  def feed_forward_block(self, x: jax.Array, norm: str) -> jax.Array:
    """A layer's last sublayer: ``x`` through ``FeedForward`` (``ffn``), added and normed."""
    return self.add_and_norm(x, FeedForward(self, name="ffn")(x), norm)


class FeedForward(nn.Module):
  """linear1 -> ReLU -> dropout -> linear2, as the original's layers.

  Below float32 the dropout's scale is applied to linear2's product (``Dropout.after_relu``'s
  ``defer_scale``): d_model numbers per token to scale instead of dim_feedforward, forward and
  backward (the R50 bf16 train step on v5e: 88 MFLOP per chip fewer, docs/accelerators.md).
  Float32 keeps flax's values bit for bit.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    y = linear(c.dim_feedforward, c.d_model, "linear1", c.dtype)(x)
    defer_scale = jnp.finfo(c.dtype).bits < 32
    y, scale = Dropout(c.dropout).after_relu(y, c.deterministic, defer_scale=defer_scale)
    return linear(c.d_model, c.dim_feedforward, "linear2", c.dtype, product_scale=scale)(y)


def attend_within_groups(
  attention: nn.Module,
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  num_groups: int,
  train: bool,
) -> jax.Array:
  """Self-attention in which each query attends only to the queries of its own group (Group DETR).

  The B x (K*Q) queries are K consecutive groups of Q; attending within each group is the
  block-diagonal attention mask of Group DETR, computed as B*K independent attentions over Q
  queries (K times less work than masking a (K*Q)^2 matrix). With one group it is plain
  self-attention, the original's.

  Args:
    attention: a ``MultiHeadAttention``.
    query, key, value: (B, K*Q, D_qk / D_qk / D_v).
    num_groups: K.
    train: enables dropout.

  Returns:
    (B, K*Q, D_v).
  """
  if num_groups == 1:
    return attention(query, key, value, None, train)
  batch, length, _ = query.shape
  split = lambda x: x.reshape(batch * num_groups, length // num_groups, x.shape[-1])
  out = attention(split(query), split(key), split(value), None, train)
  return out.reshape(batch, length, out.shape[-1])


def remat_layer(layer_cls: type[nn.Module], remat: str) -> type[nn.Module]:
  """``layer_cls`` whose backward pass recomputes (``remat``, one of ``REMAT``):

  - ``none``: nothing; the forward's activations are kept (the original's program);
  - ``attention``: everything but the outputs of the projections and feed-forward matmuls
    (``dots_with_no_batch_dims_saveable``): the attention logits, weights, dropout masks and
    outputs (the batched matmuls), the normalisations and activations, i.e. all that grows with
    the square of the token count, at the cost of a second pass through the attention;
  - ``layer``: the whole layer from its inputs (only the inputs are kept).

  Parameter names and dropout masks are those of ``layer_cls``: the recomputation draws the same
  masks from the same keys. A layer's call takes arrays only (what is static lives on the module).
  """
  if remat == "none":
    return layer_cls
  policy = (
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "attention" else None
  )
  return nn.remat(layer_cls, policy=policy)


class EncoderLayer(nn.Module):
  """Post-norm encoder layer; positions are added to queries and keys only."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, mask: jax.Array) -> jax.Array:
    """src, pos (B, L, d); mask (B, L) True on padding -> (B, L, d)."""
    c = self.config
    q = k = src + pos
    src2 = c.attend("self_attn", in_proj=True)(q, k, src, mask, train=not c.deterministic)
    return c.feed_forward_block(c.add_and_norm(src, src2, "norm1"), "norm2")


class Encoder(nn.Module):
  """A stack of post-norm encoder layers (no final norm, as the original's post-norm encoder)."""

  config: TransformerConfig
  num_layers: int

  @nn.compact
  def __call__(self, src: jax.Array, pos: jax.Array, mask: jax.Array) -> jax.Array:
    """src, pos (B, L, d); mask (B, L) -> memory (B, L, d)."""
    layer_cls = remat_layer(EncoderLayer, self.config.remat)
    for i in range(self.num_layers):
      src = layer_cls(self.config, name=f"layers_{i}")(src, pos, mask)
    return src


class ConditionalDecoderLayer(nn.Module):
  """Decoder layer with the conditional cross-attention.

  Self-attention projects content and position separately and adds them. In cross-attention
  each head's query is [content_h, spatial_h] and each key [memory_content_h, memory_pos_h]
  (concatenated per head, width 2*d in all); the first layer additionally adds a projection of
  query_pos to the content query and the memory pos to the content key (``ca_qpos_proj``).
  With ``num_groups`` K, the queries are K groups that self-attend within their group only
  (``attend_within_groups``).

  With ``record_attention``, a call whose ``intermediates`` collection is mutable sows the
  cross-attention split as the paper's Figure 1 splits it (``_sow_content_and_spatial``), and
  ``cross_attn`` sows the logits and weights the layer uses; otherwise nothing is computed for it.
  """

  config: TransformerConfig
  is_first: bool
  num_groups: int = 1
  record_attention: bool = False

  @nn.compact
  def __call__(
    self,
    tgt: jax.Array,
    memory: jax.Array,
    memory_mask: jax.Array,
    pos: jax.Array,
    query_pos: jax.Array,
    query_sine_embed: jax.Array,
  ) -> jax.Array:
    """tgt, query_pos, query_sine_embed (B, Q, d); memory, pos (B, L, d); memory_mask (B, L)
    -> (B, Q, d)."""
    c = self.config
    d, h, train = c.d_model, c.nhead, not c.deterministic
    proj = lambda name: linear(d, d, name, c.dtype)

    q = proj("sa_qcontent_proj")(tgt) + proj("sa_qpos_proj")(query_pos)
    k = proj("sa_kcontent_proj")(tgt) + proj("sa_kpos_proj")(query_pos)
    v = proj("sa_v_proj")(tgt)
    tgt2 = attend_within_groups(c.attend("self_attn"), q, k, v, self.num_groups, train)
    tgt = c.add_and_norm(tgt, tgt2, "norm1")

    q_content = proj("ca_qcontent_proj")(tgt)
    k_content = proj("ca_kcontent_proj")(memory)
    v = proj("ca_v_proj")(memory)
    k_pos = proj("ca_kpos_proj")(pos)
    if self.is_first:
      q_content = q_content + proj("ca_qpos_proj")(query_pos)
      k_content = k_content + k_pos
    q_sine = proj("ca_qpos_sine_proj")(query_sine_embed)

    def per_head_concat(content: jax.Array, spatial: jax.Array) -> jax.Array:
      b, n, _ = content.shape
      both = jnp.concatenate(
        [content.reshape(b, n, h, d // h), spatial.reshape(b, n, h, d // h)], -1
      )
      return both.reshape(b, n, 2 * d)

    q = per_head_concat(q_content, q_sine)
    k = per_head_concat(k_content, k_pos)
    # Train and eval programs never collect intermediates: they trace none of this.
    record = self.record_attention and self.is_mutable_collection("intermediates")
    if record:
      self._sow_content_and_spatial(q_content, k_content, q_sine, k_pos, memory_mask)
    tgt2 = c.attend("cross_attn", record=record)(q, k, v, memory_mask, train=train)
    return c.feed_forward_block(c.add_and_norm(tgt, tgt2, "norm2"), "norm3")

  def _sow_content_and_spatial(
    self,
    q_content: jax.Array,
    k_content: jax.Array,
    q_spatial: jax.Array,
    k_pos: jax.Array,
    memory_mask: jax.Array,
  ) -> None:
    """Sows the two parts of the cross-attention, each (B, heads, Q, L) float32.

    ``content_logits`` (q_content_h . k_content_h) and ``spatial_logits`` (the conditional spatial
    query's q_spatial_h . k_pos_h) are scaled as the attention scales their per-head concatenation,
    so they sum to its logits; ``content_weights`` and ``spatial_weights`` are each part's own
    softmax over the valid keys (``memory_mask`` (B, L) True on padding).
    """
    h = self.config.nhead
    heads = lambda x: x.reshape(x.shape[:2] + (h, x.shape[-1] // h))
    scale = (
      2 * self.config.d_model // h
    ) ** -0.5  # the concatenated head's width, as the attention's
    for part, (q, k) in (("content", (q_content, k_content)), ("spatial", (q_spatial, k_pos))):
      logits = head_logits(heads(q) * scale, heads(k))
      self.sow("intermediates", f"{part}_logits", logits)
      self.sow("intermediates", f"{part}_weights", masked_softmax(logits, memory_mask))


class ConditionalDecoder(nn.Module):
  """The conditional decoder: reference points from query_pos, conditional spatial queries.

  The reference point s = sigmoid(ref_point_head(query_pos)) is shared by all layers. Layer i's
  spatial query is sine(s) * T_i with T_0 = 1 and T_i = query_scale(output of layer i-1), where
  that output is *not* layer-normed (the original; HF's aux-loss path normalises it).
  """

  config: TransformerConfig
  num_layers: int
  num_groups: int = 1  # groups of queries (see ``attend_within_groups``)
  # The layer that sows its cross-attention (``ConditionalDecoderLayer.record_attention``);
  # negative: counted from the last; None: none.
  record_layer: int | None = None

  @nn.compact
  def __call__(
    self, memory: jax.Array, memory_mask: jax.Array, pos: jax.Array, query_pos: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """memory, pos (B, L, d); memory_mask (B, L); query_pos (B, Q, d) -> (hidden (num_layers, B,
    Q, d) float32 after the final LayerNorm, reference (B, Q, 2) float32)."""
    d, dtype = self.config.d_model, self.config.dtype
    reference = jax.nn.sigmoid(
      MLP(d, 2, 2, dtype, name="ref_point_head")(query_pos).astype(jnp.float32)
    )
    query_scale = MLP(d, d, 2, dtype, name="query_scale")
    norm = layer_norm("norm")
    sine = sine_embedding_of_points(reference, d // 2)

    output = jnp.zeros(query_pos.shape, jnp.float32)
    hidden = []
    layer_cls = remat_layer(ConditionalDecoderLayer, self.config.remat)
    layers = self.num_layers
    if self.record_layer is not None and not -layers <= self.record_layer < layers:
      raise ValueError(f"decoder layer {self.record_layer} to record: there are {layers} layers")
    for i in range(layers):
      query_sine_embed = sine if i == 0 else sine * query_scale(output)
      record = self.record_layer is not None and i == self.record_layer % layers
      layer = layer_cls(
        self.config,
        is_first=i == 0,
        num_groups=self.num_groups,
        record_attention=record,
        name=f"layers_{i}",
      )
      output = layer(output, memory, memory_mask, pos, query_pos, query_sine_embed)
      hidden.append(norm(output))
    return jnp.stack(hidden), reference


class DetrDecoderLayer(nn.Module):
  """DETR's post-norm decoder layer, the baseline of the convergence study.

  Learned query positions are added to queries (and self-attention keys); the cross-attention
  query is content + query_pos and its key memory + pos, each through the standard input
  projections of torch's nn.MultiheadAttention. The queries are ``num_groups`` groups (see
  ``attend_within_groups``).
  """

  config: TransformerConfig
  num_groups: int = 1

  @nn.compact
  def __call__(
    self,
    tgt: jax.Array,
    memory: jax.Array,
    memory_mask: jax.Array,
    pos: jax.Array,
    query_pos: jax.Array,
  ) -> jax.Array:
    """tgt, query_pos (B, Q, d); memory, pos (B, L, d); memory_mask (B, L) -> (B, Q, d)."""
    c = self.config
    train = not c.deterministic
    q = k = tgt + query_pos
    tgt2 = attend_within_groups(
      c.attend("self_attn", in_proj=True), q, k, tgt, self.num_groups, train
    )
    tgt = c.add_and_norm(tgt, tgt2, "norm1")
    tgt2 = c.attend("multihead_attn", in_proj=True)(
      tgt + query_pos, memory + pos, memory, memory_mask, train=train
    )
    return c.feed_forward_block(c.add_and_norm(tgt, tgt2, "norm2"), "norm3")


class DetrDecoder(nn.Module):
  """DETR's decoder: no reference points; returns every layer's output after the final LayerNorm."""

  config: TransformerConfig
  num_layers: int
  num_groups: int = 1

  @nn.compact
  def __call__(
    self, memory: jax.Array, memory_mask: jax.Array, pos: jax.Array, query_pos: jax.Array
  ) -> jax.Array:
    """memory, pos (B, L, d); memory_mask (B, L); query_pos (B, Q, d) -> (num_layers, B, Q, d)."""
    norm = layer_norm("norm")
    output = jnp.zeros(query_pos.shape, jnp.float32)
    hidden = []
    layer_cls = remat_layer(DetrDecoderLayer, self.config.remat)
    for i in range(self.num_layers):
      output = layer_cls(self.config, num_groups=self.num_groups, name=f"layers_{i}")(
        output, memory, memory_mask, pos, query_pos
      )
      hidden.append(norm(output))
    return jnp.stack(hidden)
