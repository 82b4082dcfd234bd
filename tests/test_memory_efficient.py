"""config.model.attention=blockwise and config.model.remat: the same model, in less memory.

Blockwise attention equals the dense one given the same dropout masks (the attention alone), and
the whole model's outputs and gradients under each memory setting equal the dense, non-recomputing
model's: with dropout on (same rng) wherever the two draw the same masks (every remat policy), with
dropout off where they draw them differently (blockwise draws per key block).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.models.attention import (
  MultiHeadAttention,
  block_keep_mask,
  blockwise_attention,
  dropped_attention,
  masked_softmax,
)
from conddetr_jax.models.dropout import Dropout, keep_mask
from configs import r50, test_tiny


def _dense_dropout_attention(q, k, v, key_padding_mask, keep, rate):
  """The original's attention written out: masked logits, softmax, dropout of the weights, times
  v."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  logits = jnp.where(key_padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
  weights = jnp.where(keep, jax.nn.softmax(logits, axis=-1) / (1 - rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def test_blockwise_attention_equals_dense_dropout_attention_given_the_same_masks():
  # 11 keys in blocks of 4: three blocks, the last one padded; q/k and v widths differ as in the
  # decoder's cross-attention; image 1 has padded keys, image 2 only padded keys (uniform weights).
  batch, len_q, len_k, heads, block, rate = 3, 5, 11, 2, 4, 0.3
  q, k, v, probe = (
    jax.random.normal(jax.random.key(i), s)
    for i, s in enumerate(
      [
        (batch, len_q, heads, 6),
        (batch, len_k, heads, 6),
        (batch, len_k, heads, 3),
        (batch, len_q, heads, 3),
      ]
    )
  )
  q = 3 * q  # sharp weights: the running max matters
  mask = jnp.zeros((batch, len_k), bool).at[1, 7:].set(True).at[2].set(True)
  rng = jax.random.key(7)
  keep = jnp.concatenate(
    [block_keep_mask(rng, j, (batch, heads, len_q, block), rate) for j in range(3)], axis=-1
  )[..., :len_k]

  def both(q, k, v):
    outs = (
      blockwise_attention(q, k, v, mask, block, rate, rng),
      _dense_dropout_attention(q, k, v, mask, keep, rate),
    )
    return tuple(jnp.sum(o * probe) for o in outs), outs

  (_, (blockwise, dense)), (grads_blockwise, grads_dense) = jax.jit(
    lambda *a: (
      both(*a),
      [jax.grad(lambda *x, i=i: both(*x)[0][i], argnums=(0, 1, 2))(*a) for i in range(2)],
    )
  )(q, k, v)
  assert 0.2 < 1 - float(keep.mean()) < 0.4  # some weights were dropped
  np.testing.assert_allclose(blockwise, dense, rtol=1e-5, atol=1e-6)
  for a, b in zip(grads_blockwise, grads_dense):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _max_relative_difference(a, b) -> float:
  """Over the leaves of two pytrees: the largest max |a - b| / max |b| of a leaf."""
  return max(
    float(jnp.abs(x - y).max() / jnp.abs(y).max())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _relative_norm_difference(a, b) -> float:
  """|a - b| / |b| with a and b two pytrees taken as one vector each (the L2 norm)."""
  squares = lambda tree: sum(
    float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree)
  )
  return (squares(jax.tree.map(jnp.subtract, a, b)) / squares(b)) ** 0.5


def _outputs_and_gradients(base_config, images, pad_mask, settings):
  """For each (model overrides, train) of ``settings``: the model's outputs and the gradient of a
  loss touching all of them, from the same initial weights and dropout rng; all in one program.

  The gradient is taken of every parameter but the backbone's: the settings change the
  transformer only, and a constant backbone (no dropout, frozen batch norm) is one forward pass
  that the compiler shares between the settings, where its backward pass would be compiled once
  per setting (most of the test's time on R50).
  """
  variables = None
  fns = []
  for overrides, train in settings:
    config = base_config()
    config.model.update(overrides)
    model = models.build_model(config)
    if variables is None:
      variables = models.init_variables(model, jax.random.key(0))

    def loss(params, model=model, train=train):
      params = {**params, "backbone": variables["params"]["backbone"]}
      out = model.apply(
        {**variables, "params": params},
        images,
        pad_mask,
        train=train,
        rngs={"dropout": jax.random.key(1)},
      )
      return jnp.sum(out["pred_logits"] ** 2) + jnp.sum(out["pred_boxes"]), out

    fns.append(jax.grad(loss, has_aux=True))
  trained = {name: p for name, p in variables["params"].items() if name != "backbone"}
  return jax.jit(lambda p: [(out, grads) for grads, out in (f(p) for f in fns)])(trained)


def _assert_same(a, b):
  """Outputs equal to 1e-5 of each output's scale, the gradient to 1e-4 of its norm.

  The gradient is compared as a whole: a rounding-level change of a ReLU's input (blockwise sums
  in another order) flips the few units sitting at 0, whose weights' gradients then differ in
  full. On the random R50 below that makes single elements of a decoder feed-forward kernel's
  gradient differ by 3.5e-3 of the kernel's largest, while the whole gradient agrees to 3e-5.
  """
  (out_a, grads_a), (out_b, grads_b) = a, b
  assert _max_relative_difference(out_a, out_b) < 1e-5
  assert _relative_norm_difference(grads_a, grads_b) < 1e-4


def _tiny_config():
  """configs/test_tiny.py with its backbone stopped after layer2 (stride 8: more tokens, less
  compile)."""
  config = test_tiny.get_config()
  config.model.backbone_num_stages = 2
  return config


def test_tiny_model_is_the_same_with_remat_and_with_blockwise_attention():
  # 64x72 images at stride 8: 8x9 tokens, which the blockwise attention takes in five blocks of 16.
  images = jax.random.normal(jax.random.key(2), (2, 64, 72, 3))
  pad_mask = jnp.zeros((2, 64, 72), bool).at[1, :, 40:].set(True)
  dense_train, layer_train, dense_eval, blockwise_eval = _outputs_and_gradients(
    _tiny_config,
    images,
    pad_mask,
    [
      (dict(), True),
      (dict(remat="layer"), True),
      (dict(), False),
      (dict(attention="blockwise", attention_block_size=16, remat="attention"), False),
    ],
  )
  _assert_same(layer_train, dense_train)  # dropout on: the recomputed layers draw the same masks
  # Blockwise attention draws its dropout masks per key block (the attention-level test above shows
  # that with the same masks it is the dense attention), so the model is compared without dropout.
  _assert_same(blockwise_eval, dense_eval)


def _r50_two_layer_config():
  """configs/r50.py with 2 encoder and 2 decoder layers: each setting acts layer by layer, and two
  of each cover a layer fed by another and the decoder's first layer, which differs from the
  rest."""
  config = r50.get_config()
  config.model.enc_layers = config.model.dec_layers = 2
  return config


@pytest.mark.slow
def test_r50_is_the_same_with_remat_and_with_blockwise_attention():
  # 128x160 images: 4x5 tokens in blocks of 8 (three, the last padded); 300 queries, whose
  # self-attention is one block; the recipe's widths (256 wide, 8 heads, 2048 feed-forward).
  images = jax.random.normal(jax.random.key(2), (1, 128, 160, 3))
  pad_mask = jnp.zeros((1, 128, 160), bool).at[0, 96:].set(True)
  settings = [
    (dict(), True),
    (dict(remat="attention"), True),
    (dict(), False),
    (dict(attention="blockwise", attention_block_size=8, remat="layer"), False),
  ]
  dense_train, attention_train, dense_eval, blockwise_eval = _outputs_and_gradients(
    _r50_two_layer_config, images, pad_mask, settings
  )
  _assert_same(attention_train, dense_train)
  _assert_same(blockwise_eval, dense_eval)


def test_masked_softmax_in_bfloat16_has_float32_softmax_gradients_and_float32_is_jax_s():
  logits = 3 * jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 7))
  mask = jnp.zeros((2, 7), bool).at[0, 5:].set(True)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), logits.shape)
  masked = jnp.where(mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits)
  want, want_vjp = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), masked)
  got, got_vjp = jax.vjp(lambda x: masked_softmax(x, mask), logits)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])
  half, half_vjp = jax.vjp(lambda x: masked_softmax(x, mask, jnp.bfloat16), logits)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), want, atol=4e-3)
  grad = half_vjp(cotangent.astype(jnp.bfloat16))[0]
  scale = float(jnp.abs(want_vjp(cotangent)[0]).max())
  np.testing.assert_allclose(grad, want_vjp(cotangent)[0], atol=2e-2 * scale)


def test_dropped_attention_is_dropout_of_the_softmax_times_v_with_one_weights_tensor_kept():
  """``dropped_attention``: the values and gradients (to rounding) of ``Dropout`` after
  ``masked_softmax`` and the product with v (padded keys included, whose weights are 0), keeping
  one (B, heads, Lq, Lk) tensor for the backward pass, the signed weights, and no keep mask."""
  shape = (2, 3, 5, 7)  # (B, heads, Lq, Lk)
  logits = 3 * jax.random.normal(jax.random.PRNGKey(0), shape)
  v = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 3, 4), jnp.bfloat16)
  mask = jnp.zeros((2, 7), bool).at[0, 5:].set(True)
  cotangent = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3, 4), jnp.bfloat16)
  rate = 0.4
  keep = keep_mask(jax.random.PRNGKey(2), shape, rate)

  def autodiff(x, v):
    weights = masked_softmax(x, mask, jnp.bfloat16)
    weights = Dropout(rate).apply({}, weights, deterministic=False, rng=jax.random.PRNGKey(2))
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

  # Compiled, as in the model (eagerly, op by op, XLA:CPU rounds the softmax differently).
  want, want_vjp = jax.vjp(jax.jit(autodiff), logits, v)
  fused = jax.jit(lambda x, v: dropped_attention(x, mask, keep, v, rate))
  got, got_vjp = jax.vjp(fused, logits, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(fused(logits, v), got)  # undifferentiated: the same values
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2)
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
    scale = float(jnp.abs(want_grad.astype(jnp.float32)).max())
    np.testing.assert_allclose(
      got_grad.astype(np.float32), want_grad.astype(np.float32), atol=2e-2 * scale
    )
  # Of the logits' shape: what the attention without dropout keeps (the padding mask's residuals
  # and the weights); autodiff of the dropout also keeps its mask.
  undropped = lambda x, v: jnp.einsum("bhqk,bkhd->bqhd", masked_softmax(x, mask, jnp.bfloat16), v)
  kept = {}
  for name, f in (("fused", got_vjp), ("undropped", jax.vjp(undropped, logits, v)[1])):
    kept[name] = sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(f))
    kept[name] = [pair for pair in kept[name] if pair[0] == shape]
  assert kept["fused"] == kept["undropped"], kept
  assert (shape, jnp.dtype(jnp.bool_)) in [
    (leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(want_vjp)
  ]
  assert len([leaf for leaf in jax.tree.leaves(want_vjp) if leaf.shape == shape]) > len(
    kept["fused"]
  )


def test_a_training_attention_in_bfloat16_keeps_no_dropout_mask_and_draws_float32_s_masks():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 8)) for i in range(3))
  rngs = {"dropout": jax.random.PRNGKey(3)}
  masks = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    attention = MultiHeadAttention(num_heads=2, dropout=0.5, dtype=dtype)
    variables = attention.init(jax.random.PRNGKey(0), q, k, v)
    apply = lambda x: attention.apply(
      variables, x, k, v, train=True, rngs=rngs, capture_intermediates=lambda *_: True
    )
    (_, state), vjp_fn = jax.vjp(apply, q.astype(dtype))
    kept = [leaf.shape for leaf in jax.tree.leaves(vjp_fn) if leaf.dtype == jnp.bool_]
    captured = state["intermediates"]["Dropout_0"]
    if dtype == jnp.float32:  # autodiff of the dropout: its mask is kept
      assert (2, 2, 5, 5) in kept, kept
      masks[dtype] = captured["__call__"][0] != 0
    else:
      assert (2, 2, 5, 5) not in kept, kept
      masks[dtype] = captured["keep"][0]
  assert 0 < int(masks[jnp.float32].sum()) < masks[jnp.float32].size
  np.testing.assert_array_equal(masks[jnp.bfloat16], masks[jnp.float32])


def _equations(jaxpr):
  """Every equation of a jaxpr in program order, those of nested jaxprs (pjit, custom_vjp) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _equations(inner)


def test_bfloat16_logits_come_out_of_the_product_in_float32_and_stay_so_until_the_softmax():
  """Under bf16 the (B, heads, Lq, Lk) logits are the product's float32 accumulator: no bf16
  rounding and no float32 copy of the largest tensor (fewer bytes on TPU, docs/accelerators.md);
  and ``masked_softmax`` gives bf16 logits the weights of float32 logits of the same values."""
  attention = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 8), jnp.bfloat16) for i in range(3))
  mask = jnp.zeros((2, 5), bool).at[0, 3:].set(True)
  variables = attention.init(jax.random.PRNGKey(0), q, k, v, mask)
  jaxpr = jax.make_jaxpr(lambda x: attention.apply(variables, x, k, v, mask))(q).jaxpr
  on_logits = [
    (eqn.primitive.name, eqn.outvars[0].aval.dtype)
    for eqn in _equations(jaxpr)
    if eqn.outvars and getattr(eqn.outvars[0].aval, "shape", None) == (2, 2, 5, 5)
  ]
  softmax = next(i for i, (name, _) in enumerate(on_logits) if name.startswith("custom_vjp"))
  assert on_logits[0] == ("dot_general", jnp.float32), on_logits
  # Before the softmax (``softmax_as``): float32 values (and the padding mask's booleans).
  assert all(dtype in (jnp.float32, jnp.bool_) for _, dtype in on_logits[:softmax]), on_logits
  assert on_logits[-1][1] == jnp.bfloat16, on_logits  # the weights the product with v reads

  logits = 3 * jax.random.normal(jax.random.PRNGKey(4), (2, 3, 5, 5), jnp.bfloat16)
  np.testing.assert_array_equal(
    masked_softmax(logits, mask, jnp.bfloat16),
    masked_softmax(logits.astype(jnp.float32), mask, jnp.bfloat16),
  )
