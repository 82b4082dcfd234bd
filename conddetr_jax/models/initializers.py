"""Parameter initialisers that reproduce PyTorch's defaults, so a fresh model starts as the
original.

PyTorch's ``nn.Linear``/``nn.Conv2d`` draw weights from kaiming_uniform(a=sqrt(5)) and biases from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the original's Transformer then re-draws every matrix with
xavier_uniform. Flax's defaults differ (lecun_normal, zero bias), hence these helpers.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in).
torch_default_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = jax.nn.initializers.xavier_uniform()
# torchvision ResNet convs: kaiming_normal_(mode="fan_out", nonlinearity="relu").
resnet_conv_kernel = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias(fan_in: int) -> Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias init for Linear/Conv layers."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def packed_xavier_uniform(num_packed: int) -> Initializer:
  """xavier_uniform as drawn for one slice of a packed (num_packed*d, d) matrix.

  ``nn.MultiheadAttention`` stores q, k and v projections in one ``in_proj_weight`` of shape
  (3d, d), and the original applies xavier_uniform to that whole matrix: bound
  sqrt(6 / (d + 3d)). Here the three projections are separate Dense layers with kernels
  (d_in, d_out), each drawn with the packed matrix's bound.
  """

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    fan_in, fan_out = shape[-2], shape[-1]
    bound = math.sqrt(6.0 / (fan_in + num_packed * fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
