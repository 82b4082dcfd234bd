"""The built-in demo: a small Conditional DETR trained from random weights on generated shapes, on a CPU.

Command: python train.py --config=configs/demo.py --workdir=/tmp/conddetr_demo
Generates the synthetic dataset (1000 train / 200 val images of 128-192 px, four shape classes,
objects 25-60% of the shorter side) under ~/.cache/conddetr_jax if absent, trains a ResNet-18
model with a small transformer for 1000 steps of 4 images, evaluates COCO box AP on the val split
and draws predictions to <workdir>/predictions/*.png. Measured result: see the README; why its AP
stays low (box regression from random weights is slow) and the variants measured against it:
docs/training-from-scratch.md and docs/demo-levers.md.

Where it departs from the original's recipe, and why (it trains with no ImageNet weights, which
the original always starts from):
- the backbone uses GroupNorm after weight-standardised convs and is trained whole, stem and
  layer1 included, at the full learning rate: frozen BatchNorm holding init statistics normalises
  nothing, and the original freezes and slows the backbone only to preserve its ImageNet features
  (GroupNorm makes detectors train from scratch, He et al., "Rethinking ImageNet Pre-training",
  2019; weight standardisation speeds GroupNorm up, Qiao et al., 2019);
- the backbone stops after layer2 (features at stride 8: 16x24 to 20x24 cells at the eval size; no
  layer3 or layer4 compute): at stride 32 the 4x5 to 6x6 cells localise slowly;
- one encoder layer with a narrow feed-forward block (256 wide, the decoder's too): at stride 8 an
  encoder layer of the usual width costs a third more step time on a CPU, the narrow one less, and
  25 queries (at most 6 objects per image) pay for part of it (docs/demo-levers.md, fifth round);
- a dense head on the encoder's tokens during training (model.dense_head, Co-DETR-style
  one-to-many supervision): many positives per object for the features to learn from;
- evaluation at 160 px, above the 112-144 px of training: the finer cells gave 0.002-0.009 AP on
  every checkpoint tried, at no training cost;
- learning rate 2e-4, dropped x0.1 after 3 epochs (750 steps).
docs/demo-levers.md measures each of these against the others.
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The demo config: small images, ResNet-18 up to layer2 with GroupNorm and WS, 1 narrow encoder layer,
  3 decoder layers, a dense head in training, 25 queries."""
  config = default.get_config()
  config.model.update(backbone="resnet18", backbone_norm="group_norm_ws", freeze_stem_and_layer1=False,
                      backbone_num_stages=2, dense_head=True,
                      hidden_dim=256, nheads=8, enc_layers=1, dec_layers=3, dim_feedforward=256, dropout=0.0,
                      num_queries=25, num_classes=10)
  # Images are 128-192 px: train and evaluate near that size (the original: 480-800 and 800).
  config.dataset.update(
      source="synthetic", synthetic_object_size=(0.25, 0.6), train_scales=(112, 128, 144),
      train_max_size=192, crop_resize_scales=(160,), crop_min_size=112, crop_max_size=160,
      eval_size=160, eval_max_size=192, size_divisibility=32, num_buckets=2, max_boxes=10)
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
