r"""Conditional DETR-R101, 50 epochs (the original's 42.8 AP on COCO val2017).

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet101-63fe2227.pth
  python train.py --config=configs/r101.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet101-63fe2227.pth
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """R101: the defaults with another backbone/dilation."""
  config = default.get_config()
  config.model.backbone = "resnet101"
  config.model.dilation = False
  return config
