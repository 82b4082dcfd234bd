"""ResNet-18/34/50/101 in torchvision's layout: frozen BatchNorm, a frozen stem and layer1, DC5,
fewer stages for small images, and optional masking of a padded image's padding.

The facts parity depends on (explicit symmetric padding, FrozenBatchNorm's formula, where DC5's
dilations go) are listed in docs/parity.md#the-backbone; why masking makes a padded image's
features equal to those of the image alone is in docs/evaluation.md.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from conddetr_jax.models import convolution, initializers, pooling

# name -> (block type, blocks per stage)
RESNET_SPECS = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
  "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
FROZEN_BN_EPS = 1e-5
NORMS = ("frozen_bn", "group_norm", "group_norm_ws")
WEIGHT_STANDARDIZATION_EPS = (
  1e-10  # on the variance, as BiT (Kolesnikov et al., 2020): kernels have var ~1e-3
)
NUM_STAGES = (
  2,
  3,
  4,
)  # stages after the stem: layer1..layer2, ..layer3, or ..layer4 (the original)
GROUP_NORM_GROUPS = 32  # divides every stage width (64 ... 2048)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine parameters (torchvision's FrozenBatchNorm2d)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C); ``valid`` is ignored (the norms' common signature)."""
    features = x.shape[-1]
    stat = lambda name, init: self.variable("batch_stats", name, init, (features,), jnp.float32)
    scale = stat("scale", jnp.ones).value
    bias = stat("bias", jnp.zeros).value
    mean = stat("mean", jnp.zeros).value
    var = stat("var", jnp.ones).value
    del valid  # pointwise: the padded region cannot reach the valid one
    mul = scale * jax.lax.rsqrt(var + FROZEN_BN_EPS)
    add = bias - mean * mul
    # In float32 even under bf16 compute: ``add`` largely cancels ``x * mul`` (mean removal), and
    # rounding both to bf16 first loses part of the difference (measured on a random R50: 12%
    # relative feature error against float32 torch, 9% this way). Fused into the conv epilogue.
    return (x.astype(jnp.float32) * mul + add).astype(self.dtype)


def feature_stride(num_stages: int, dilation: bool) -> int:
  """The stride of ``ResNet(num_stages=..., dilation=...)``'s features: 4 after the stem, x2 per
  stage after layer1, the last one undone by its dilation."""
  return 2 ** (num_stages + 1) // (2 if dilation else 1)


def strided_valid(valid: jax.Array | None, stride: int) -> jax.Array | None:
  """The valid mask (B, H, W, 1) at the output of a conv or pool of ``stride``:
  (B, ceil(H / stride), ceil(W / stride), 1); output i is centred on input i * stride."""
  if valid is None or stride == 1:
    return valid
  return valid[:, ::stride, ::stride]


def _masked(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """``x`` (B, H, W, C), zero on the padded region where ``valid`` (B, H, W, 1) is given."""
  return x if valid is None else jnp.where(valid, x, jnp.zeros((), x.dtype))


def _standardized_conv(
  inputs: jax.Array, kernel: jax.Array, *args: Any, **kwargs: Any
) -> jax.Array:
  """The conv with its kernel standardised per output channel (zero mean, unit variance over
  kh, kw and input channels): Weight Standardization (Qiao et al., 2019)."""
  mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
  var = kernel.var(axis=(0, 1, 2), keepdims=True)
  kernel = (kernel - mean) * jax.lax.rsqrt(var + WEIGHT_STANDARDIZATION_EPS)
  return convolution.conv_general_dilated(inputs, kernel, *args, **kwargs)


def _conv(
  features: int,
  kernel: int,
  stride: int = 1,
  dilation: int = 1,
  name: str | None = None,
  dtype: Any = jnp.float32,
  norm: str = "frozen_bn",
) -> nn.Conv:
  """A bias-free conv padded like PyTorch's Conv2d(padding=dilation*(kernel//2)); under the
  ``group_norm_ws`` norm its kernel is weight-standardised."""
  pad = dilation * (kernel // 2)
  conv_fn = _standardized_conv if norm == "group_norm_ws" else convolution.conv_general_dilated
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    kernel_dilation=(dilation, dilation),
    use_bias=False,
    dtype=dtype,
    kernel_init=initializers.resnet_conv_kernel,
    conv_general_dilated=conv_fn,
    name=name,
  )


def _norm(kind: str, dtype: Any, name: str, ends_residual_branch: bool = False) -> nn.Module:
  """The backbone's normalisation layer ``kind`` (one of ``NORMS``), under torchvision's name.

  ``group_norm`` is for training from random weights (GroupNorm makes from-scratch detector
  training work, He et al., "Rethinking ImageNet Pre-training", 2019); the last one of each
  residual branch starts with a zero scale so every block starts as the identity (Goyal et al.,
  2017). ``group_norm_ws`` is the same GroupNorm after weight-standardised convs (``_conv``),
  which train faster than GroupNorm alone (Qiao et al., "Micro-Batch Training with
  Batch-Channel Normalization and Weight Standardization", 2019).
  """
  if kind in ("group_norm", "group_norm_ws"):
    scale_init = nn.initializers.zeros if ends_residual_branch else nn.initializers.ones
    return MaskedGroupNorm(
      GROUP_NORM_GROUPS,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=scale_init,
      name=name,
    )
  return FrozenBatchNorm(dtype, name=name)


class MaskedGroupNorm(nn.GroupNorm):
  """``nn.GroupNorm`` (same parameters) whose statistics cover the valid region only, where given:
  the unpadded image's statistics, so padding changes no valid output."""

  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x: (B, H, W, C), valid (B, H, W, 1) bool or None -> (B, H, W, C)."""
    return super().__call__(x, mask=None if valid is None else jnp.broadcast_to(valid, x.shape))


class _ResidualBlock(nn.Module):
  """Fields shared by both block types; ``downsample`` adds torchvision's 1x1 conv shortcut.

  ``dilation`` is that of the 3x3 conv holding the block's stride (in a DC5 stage's first block,
  the previous stage's); ``stage_dilation`` that of 3x3 convs after it (a BasicBlock's conv2),
  which see the stage's resolution.
  """

  width: int
  stride: int = 1
  dilation: int = 1
  stage_dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs (ResNet-18/34)."""

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x (B, H, W, Cin), valid (B, H, W, 1) bool or None -> (B, ceil(H / s), ceil(W / s), width),
    s the stride."""
    out_valid = strided_valid(valid, self.stride)
    conv1 = _conv(self.width, 3, self.stride, self.dilation, "conv1", self.dtype, self.norm)
    y = nn.relu(_norm(self.norm, self.dtype, "bn1")(conv1(_masked(x, valid)), out_valid))
    conv2 = _conv(self.width, 3, 1, self.stage_dilation, "conv2", self.dtype, self.norm)
    y = conv2(_masked(y, out_valid))
    y = _norm(self.norm, self.dtype, "bn2", ends_residual_branch=True)(y, out_valid)
    return nn.relu(y + _shortcut(self, x, valid))


class Bottleneck(_ResidualBlock):
  """1x1 -> 3x3 (strided, dilated) -> 1x1 with 4x expansion (ResNet-50/101, v1.5)."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x (B, H, W, Cin), valid (B, H, W, 1) bool or None -> (B, ceil(H / s), ceil(W / s), 4 width),
    s the stride."""
    out_valid = strided_valid(valid, self.stride)
    y = _conv(self.width, 1, name="conv1", dtype=self.dtype, norm=self.norm)(_masked(x, valid))
    y = nn.relu(_norm(self.norm, self.dtype, "bn1")(y, valid))
    conv2 = _conv(self.width, 3, self.stride, self.dilation, "conv2", self.dtype, self.norm)
    y = nn.relu(_norm(self.norm, self.dtype, "bn2")(conv2(_masked(y, valid)), out_valid))
    conv3 = _conv(self.width * 4, 1, name="conv3", dtype=self.dtype, norm=self.norm)
    y = conv3(_masked(y, out_valid))
    y = _norm(self.norm, self.dtype, "bn3", ends_residual_branch=True)(y, out_valid)
    return nn.relu(y + _shortcut(self, x, valid))


def _shortcut(block: _ResidualBlock, x: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Identity, or torchvision's ``downsample`` (1x1 strided conv + BN) when shapes change."""
  if not block.downsample:
    return x
  y = _conv(
    block.width * block.expansion,
    1,
    block.stride,
    name="downsample_conv",
    dtype=block.dtype,
    norm=block.norm,
  )(_masked(x, valid))
  return _norm(block.norm, block.dtype, "downsample_bn")(y, strided_valid(valid, block.stride))


class ResNet(nn.Module):
  """The ResNet body up to layer4 (``num_stages=4``, the original's), layer3 or layer2
  (``num_stages`` 3 or 2), returning the last stage's feature map: stride 32 (DC5: 16), 16 with 3
  stages (dilated: 8), 8 with 2 stages (dilated: 4).

  Submodule names mirror torchvision's keys: ``conv1``, ``bn1``, ``layer{1..4}_{i}`` with
  ``conv{1,2,3}``, ``bn{1,2,3}``, ``downsample_conv``, ``downsample_bn``.
  """

  arch: str = "resnet50"
  dilation: bool = False
  dtype: Any = jnp.float32
  freeze_stem_and_layer1: bool = True
  norm: str = "frozen_bn"
  num_stages: int = 4

  @nn.compact
  def __call__(self, images: jax.Array, pad_mask: jax.Array | None = None) -> jax.Array:
    """images: (B, H, W, 3) normalised -> features (B, ceil(H/s), ceil(W/s), C), s the stride above
    (``feature_stride``). With ``pad_mask`` (B, H, W) bool, True on padding, the padded region is
    masked (module docstring): each image's valid features are those it has alone, unpadded."""
    if self.arch not in RESNET_SPECS:
      raise ValueError(f"config.model.backbone={self.arch!r} is not one of {sorted(RESNET_SPECS)}")
    kind, depths = RESNET_SPECS[self.arch]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    valid = None if pad_mask is None else ~pad_mask[..., None]

    x = _masked(images.astype(self.dtype), valid)
    valid = strided_valid(valid, 2)
    x = _conv(64, 7, 2, name="conv1", dtype=self.dtype, norm=self.norm)(x)
    x = nn.relu(_norm(self.norm, self.dtype, "bn1")(x, valid))
    x = pooling.max_pool_3x3_stride2(_masked(x, valid))
    valid = strided_valid(valid, 2)

    in_features = 64
    dilation = 1
    for stage, (width, depth) in enumerate(zip(STAGE_WIDTHS[: self.num_stages], depths), start=1):
      stride = 1 if stage == 1 else 2
      previous_dilation = dilation
      if stage == self.num_stages and self.dilation:
        dilation, stride = dilation * stride, 1
      for i in range(depth):
        first = i == 0
        x = block_cls(
          width,
          stride=stride if first else 1,
          dilation=previous_dilation if first else dilation,
          stage_dilation=dilation,
          downsample=first and (stride != 1 or in_features != width * block_cls.expansion),
          dtype=self.dtype,
          norm=self.norm,
          name=f"layer{stage}_{i}",
        )(x, valid)
        valid = strided_valid(valid, stride if first else 1)
        in_features = width * block_cls.expansion
      if stage == 1 and self.freeze_stem_and_layer1:
        # The original never trains the (ImageNet-initialised) stem and layer1.
        x = jax.lax.stop_gradient(x)
    return x


def is_frozen_backbone_param(path: Sequence[str]) -> bool:
  """True for parameters of the stem (conv1) and layer1, which the original never trains.

  ``path`` is a parameter's key path *inside* the backbone, e.g. ("layer1_0", "conv1", "kernel").
  """
  return path[0] == "conv1" or path[0].startswith("layer1_")
