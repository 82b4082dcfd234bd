"""Conditional DETR-R101, 50 epochs (the original's 42.8 AP on COCO val2017).

Command: python train.py --config=configs/r101.py --workdir=DIR --config.dataset.root=/path/to/coco
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """R101: the defaults with another backbone/dilation."""
  config = default.get_config()
  config.model.backbone = "resnet101"
  config.model.dilation = False
  return config
