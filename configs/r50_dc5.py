"""Conditional DETR-DC5-R50, 50 epochs (the original's 43.7 AP on COCO val2017).

Command: python train.py --config=configs/r50_dc5.py --workdir=DIR --config.dataset.root=/path/to/coco
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """DC5-R50: the defaults with another backbone/dilation."""
  config = default.get_config()
  config.model.backbone = "resnet50"
  config.model.dilation = True
  return config
