"""The built-in demo: a small Conditional DETR trained from random weights on generated shapes, on a
CPU.

  python train.py --config=configs/demo.py --workdir=/tmp/conddetr_demo

Generates 1000 train / 200 val images of four shape classes under ~/.cache/conddetr_jax (once),
trains 1000 steps of 4 images (about 11 minutes on 2 CPU cores), evaluates and draws predictions.
Expect AP about 0.15 (docs/results.md). Where it departs from the original's recipe, and why:
docs/demo-levers.md ("The demo's recipe").
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The demo config: small images, ResNet-18 up to layer2 with GroupNorm and WS, 1 narrow encoder
  layer, 3 decoder layers, a dense head in training, 25 queries."""
  config = default.get_config()
  config.model.update(
    backbone="resnet18",
    backbone_norm="group_norm_ws",
    freeze_stem_and_layer1=False,
    backbone_num_stages=2,
    dense_head=True,
    hidden_dim=256,
    nheads=8,
    enc_layers=1,
    dec_layers=3,
    dim_feedforward=256,
    dropout=0.0,
    num_queries=25,
    num_classes=10,
  )
  # Images are 128-192 px: train and evaluate near that size (the original: 480-800 and 800).
  config.dataset.update(
    source="synthetic",
    synthetic_object_size=(0.25, 0.6),
    train_scales=(112, 128, 144),
    train_max_size=192,
    crop_resize_scales=(160,),
    crop_min_size=112,
    crop_max_size=160,
    eval_size=160,
    eval_max_size=192,
    size_divisibility=32,
    num_buckets=2,
    max_boxes=10,
  )
  config.optimizer.update(lr=2e-4, backbone_lr_mult=1.0)
  config.global_batch_size = 0  # not a recipe of the original: the batch grows with the devices
  config.per_device_batch_size = 4
  config.eval_per_device_batch_size = 8
  config.total_steps = 1000
  config.lr_drop_epoch = 3
  config.log_every_steps = 25
  config.checkpoint_every_steps = 500
  config.eval_every_steps = -1
  config.evaluation.prediction_images = 4
  config.evaluation.score_threshold = 0.25  # after 1000 steps the best scores are ~0.3-0.4
  return config
