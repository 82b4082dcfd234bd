r"""Conditional DETR-R50, 50 epochs (the original's 41.0 AP on COCO val2017).

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet50-0676ba61.pth
  python train.py --config=configs/r50.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet50-0676ba61.pth
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """R50: the defaults."""
  return default.get_config()
