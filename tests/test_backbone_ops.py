"""The backbone's rewritten ops against PyTorch's autograd: 1x1 convs as matrix products and the
stem max-pool with its own backward (both for XLA:CPU speed, docs/cpu-step.md)."""

import flax.linen as nn
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conddetr_jax.models import convolution
from conddetr_jax.models.pooling import max_pool_3x3_stride2


def _torch_grads(fn, *arrays):
  """fn's output and the gradients of sum(output * weights) for fixed random weights, in torch."""
  tensors = [torch.tensor(np.asarray(a), requires_grad=True) for a in arrays]
  out = fn(*tensors)
  weights = torch.tensor(np.random.default_rng(1).normal(size=out.shape).astype(np.float32))
  (out * weights).sum().backward()
  return out.detach().numpy(), [t.grad.numpy() for t in tensors], weights.numpy()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("height", [7, 8])
def test_pointwise_conv_and_its_gradients_match_torch_conv2d(stride, height):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, height, 9, 16)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, 16, 24)).astype(np.float32)
  conv = nn.Conv(
    24,
    (1, 1),
    strides=(stride, stride),
    padding=((0, 0), (0, 0)),
    use_bias=False,
    conv_general_dilated=convolution.conv_general_dilated,
  )
  params = {"params": {"kernel": jnp.asarray(kernel)}}

  ref_out, (ref_dx, ref_dk), weights = _torch_grads(
    lambda x_, k_: F.conv2d(x_.permute(0, 3, 1, 2), k_.permute(3, 2, 0, 1), stride=stride).permute(
      0, 2, 3, 1
    ),
    x,
    kernel,
  )
  out, vjp = jax.vjp(lambda x_, p_: conv.apply(p_, x_), jnp.asarray(x), params)
  dx, dparams = vjp(jnp.asarray(weights))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dparams["params"]["kernel"], ref_dk, rtol=1e-5, atol=1e-4)


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
def test_only_programs_for_the_cpu_compute_1x1_convs_as_matrix_products(platform):
  """On TPU the flattened activation cost DC5-R50 5.7 GiB more per chip (docs/accelerators.md);
  the choice must follow the compile target, as when the aot tool compiles for TPU on a CPU."""
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
  ops = {op for op in ("stablehlo.convolution", "stablehlo.dot_general") if op in program}
  assert ops == {"stablehlo.dot_general" if platform == "cpu" else "stablehlo.convolution"}


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
