"""A tiny run for tests and smoke checks: ResNet-18 up to layer2, a 1+2-layer transformer, 64 px
synthetic images.

Command: python train.py --config=configs/test_tiny.py --workdir=/tmp/tiny
Trains a few steps in well under a minute on a CPU; the numbers mean nothing.
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The tiny config: every shape small, one padded batch shape (64x64), no periodic eval."""
  config = default.get_config()
  # ResNet-18 up to layer2 (0.7 M parameters, not 11 M): what the tests check does not depend on
  # layer3 and layer4, and without them a test step updates 16x fewer weights (docs/testing.md).
  config.model.update(
    backbone="resnet18",
    backbone_num_stages=2,
    hidden_dim=32,
    nheads=4,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=10,
    num_classes=10,
  )
  config.dataset.update(
    source="synthetic",
    synthetic_num_train=32,
    synthetic_num_val=8,
    synthetic_image_size=(64, 96),
    train_scales=(48, 56, 64),
    train_max_size=64,
    crop_resize_scales=(48, 64),
    crop_min_size=32,
    crop_max_size=48,
    eval_size=64,
    eval_max_size=64,
    size_divisibility=32,
    buckets=((64, 64),),
    max_boxes=8,
    num_parallel_calls=1,
  )
  config.global_batch_size = 0  # not a recipe of the original: the batch grows with the devices
  config.per_device_batch_size = 2
  config.eval_per_device_batch_size = 4
  config.total_steps = 8
  config.lr_drop_epoch = 1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.eval_every_steps = -1
  return config
