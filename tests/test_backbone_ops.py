"""The backbone's rewritten ops against PyTorch's autograd: 1x1 convs as products (for XLA:CPU
speed and XLA:TPU traffic) and the stem max-pool with its own backward (docs/cpu-step.md)."""

import flax.linen as nn
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conddetr_jax.models import convolution, pooling
from conddetr_jax.models.pooling import max_pool_3x3_stride2


def _torch_grads(fn, *arrays):
  """fn's output and the gradients of sum(output * weights) for fixed random weights, in torch."""
  tensors = [torch.tensor(np.asarray(a), requires_grad=True) for a in arrays]
  out = fn(*tensors)
  weights = torch.tensor(np.random.default_rng(1).normal(size=out.shape).astype(np.float32))
  (out * weights).sum().backward()
  return out.detach().numpy(), [t.grad.numpy() for t in tensors], weights.numpy()


@pytest.mark.parametrize("flatten", [True, False], ids=["cpu_form", "tpu_form"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height", [7, 8])
def test_pointwise_conv_and_its_gradients_match_torch_conv2d(stride, height, flatten):
  """Both product forms (the flattened matrix product CPU programs get, the 4-D contraction TPU
  programs get) against PyTorch's conv2d, through the parameters ``nn.Conv`` would hold."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, height, 9, 16)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, 16, 24)).astype(np.float32)

  ref_out, (ref_dx, ref_dk), weights = _torch_grads(
    lambda x_, k_: F.conv2d(x_.permute(0, 3, 1, 2), k_.permute(3, 2, 0, 1), stride=stride).permute(
      0, 2, 3, 1
    ),
    x,
    kernel,
  )
  out, vjp = jax.vjp(
    lambda x_, k_: convolution.pointwise_product(
      x_, k_, (stride, stride), precision=None, flatten=flatten
    ),
    jnp.asarray(x),
    jnp.asarray(kernel),
  )
  dx, dk = vjp(jnp.asarray(weights))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-4)


def test_a_pointwise_nn_conv_matches_torch_conv2d_on_this_cpu():
  """``conv_general_dilated`` as ``nn.Conv`` calls it: the platform dispatch and the parameter
  layout, end to end (a strided conv, the downsample shortcut's case)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 9, 16)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, 16, 24)).astype(np.float32)
  conv = nn.Conv(
    24,
    (1, 1),
    strides=(2, 2),
    padding=((0, 0), (0, 0)),
    use_bias=False,
    conv_general_dilated=convolution.conv_general_dilated,
  )
  out = conv.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x))
  ref = F.conv2d(
    torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(kernel).permute(3, 2, 0, 1), stride=2
  ).permute(0, 2, 3, 1)
  np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_pointwise_path_is_taken_only_for_plain_1x1_convs():
  """A 3x3 conv (or a padded 1x1 one) must still be a real convolution."""
  x = jnp.ones((1, 6, 6, 4))
  for kernel_size, padding in (
    ((1, 1), ((0, 0), (0, 0))),
    ((3, 3), ((1, 1), (1, 1))),
    ((1, 1), ((1, 1), (1, 1))),
  ):
    conv = nn.Conv(
      8,
      kernel_size,
      padding=padding,
      use_bias=False,
      conv_general_dilated=convolution.conv_general_dilated,
    )
    hlo = (
      jax.jit(lambda v, x_, c=conv: c.apply(v, x_))
      .lower(conv.init(jax.random.PRNGKey(0), x), x)
      .as_text()
    )
    pointwise = kernel_size == (1, 1) and padding == ((0, 0), (0, 0))
    assert ("convolution" in hlo) != pointwise, (kernel_size, padding)


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_1x1_convs_are_products_on_cpu_flattened_and_on_tpu_not_and_convolutions_on_gpu(platform):
  """The form must follow the compile target, as when the aot tool compiles for TPU on a CPU:
  flattening cost DC5-R50 5.7 GiB more per v5e chip, and the TPU convolution's layouts cost R50's
  step a fifth of its bytes (docs/accelerators.md)."""
  conv = nn.Conv(
    8,
    (1, 1),
    padding=((0, 0), (0, 0)),
    use_bias=False,
    conv_general_dilated=convolution.conv_general_dilated,
  )
  x = jnp.ones((2, 6, 6, 4))
  variables = conv.init(jax.random.PRNGKey(0), x)
  train_step = jax.jit(jax.grad(lambda v, x_: conv.apply(v, x_).sum()))
  program = export.export(train_step, platforms=(platform,))(variables, x).mlir_module()
  products = [line for line in program.splitlines() if "stablehlo.dot_general" in line]
  flattened = [line for line in products if "tensor<72x4xf32>" in line]  # (2*6*6, 4)
  if platform == "cuda":
    assert "stablehlo.convolution" in program and not products
  else:
    assert "stablehlo.convolution" not in program and products
    assert bool(flattened) == (platform == "cpu"), products


@pytest.mark.parametrize("shape", [(2, 12, 16, 8), (1, 7, 9, 4)])
def test_stem_max_pool_and_its_gradient_match_torch_including_ties(shape):
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # ReLU'd: many tied zeros
  x[:, :4, :4, :] = 1.5  # tied positive values, as a padded image region gives
  x[0, -1, :, 0] = -2.0  # a negative border row: the -inf padding must never win

  ref_out, (ref_dx,), weights = _torch_grads(
    lambda x_: F.max_pool2d(x_.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1), x
  )
  out, vjp = jax.vjp(max_pool_3x3_stride2, jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(weights))
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_stem_max_pool_is_a_reduce_window_only_differentiated_on_tpu(platform):
  """The TPU train step's pool is XLA's reduce-window (XLA:TPU materialises the nine taps);
  XLA:CPU keeps the taps (its reduce-window is slower), and so does every undifferentiated
  program, on every platform: serving exports, which jax2onnx converts (tests/test_export.py)."""
  x = jnp.ones((1, 6, 6, 2))

  def program(fn):
    return export.export(jax.jit(fn), platforms=(platform,))(x).mlir_module()

  train = program(jax.grad(lambda x_: max_pool_3x3_stride2(x_).sum()))
  serve = program(max_pool_3x3_stride2)
  assert ("stablehlo.reduce_window" in train) == (platform == "tpu")
  assert "stablehlo.reduce_window" not in serve and "platform_index" not in serve


def test_stem_max_pool_reduce_window_form_finds_the_taps_maximum_and_first_winner():
  """The TPU form (reduce-window, then the first tap equal to it) against the taps' own (checked
  against PyTorch above), ties and a negative border included."""
  rng = np.random.default_rng(0)
  x = np.maximum(rng.normal(size=(2, 9, 11, 3)), 0).astype(np.float32)  # many tied zeros
  x[:, :4, :4, :] = 1.5
  x[0, -1, :, 0] = -2.0
  taps_best, taps_index = pooling._taps_max_and_index(jnp.asarray(x))
  window_best, window_index = pooling._reduce_window_max_and_index(jnp.asarray(x))
  np.testing.assert_array_equal(window_best, taps_best)
  np.testing.assert_array_equal(window_index, taps_index)
