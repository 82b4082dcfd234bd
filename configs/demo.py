"""The built-in demo: a small Conditional DETR trained from scratch on generated shapes, on a CPU.

Command: python train.py --config=configs/demo.py --workdir=/tmp/conddetr_demo
Generates the synthetic dataset (1000 train / 200 val images of 128-192 px, four shape classes)
under ~/.cache/conddetr_jax if absent, trains a ResNet-18 model with a small transformer, evaluates
COCO box AP on the val split and draws predictions to <workdir>/predictions/*.png.
Measured result: see the README's results table.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The demo config: small images, ResNet-18, a 2+3-layer transformer of width 256, 10 queries."""
  config = default.get_config()
  config.model.update(backbone="resnet18", hidden_dim=256, nheads=8, enc_layers=2, dec_layers=3,
                      dim_feedforward=1024, dropout=0.0, num_queries=10, num_classes=10)
  # Images are 128-192 px: train and evaluate near that size (the original: 480-800 and 800).
  config.dataset.update(
      source="synthetic", train_scales=(112, 128, 144), train_max_size=192,
      crop_resize_scales=(160,), crop_min_size=112, crop_max_size=160,
      eval_size=128, eval_max_size=192, size_divisibility=32, num_buckets=2, max_boxes=10)
  config.optimizer.update(lr=2e-4)
  config.per_device_batch_size = 4
  config.eval_per_device_batch_size = 8
  config.total_steps = 1500
  config.lr_drop_epoch = 5
  config.log_every_steps = 25
  config.checkpoint_every_steps = 500
  config.eval_every_steps = -1
  config.evaluation.prediction_images = 4
  config.evaluation.score_threshold = 0.4
  return config
