r"""Conditional DETR-DC5-R101, 50 epochs (the original's 45.0 AP on COCO val2017).

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet101-63fe2227.pth
  python train.py --config=configs/r101_dc5.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet101-63fe2227.pth
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """DC5-R101: the defaults with another backbone/dilation."""
  config = default.get_config()
  config.model.backbone = "resnet101"
  config.model.dilation = True
  return config
