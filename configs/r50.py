"""Conditional DETR-R50, 50 epochs (the original's 41.0 AP on COCO val2017).

Command: python train.py --config=configs/r50.py --workdir=DIR --config.dataset.root=/path/to/coco
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """R50: the defaults."""
  return default.get_config()
