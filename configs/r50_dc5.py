r"""Conditional DETR-DC5-R50, 50 epochs (the original's 43.7 AP on COCO val2017).

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet50-0676ba61.pth
  python train.py --config=configs/r50_dc5.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet50-0676ba61.pth
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """DC5-R50: the defaults with another backbone/dilation."""
  config = default.get_config()
  config.model.backbone = "resnet50"
  config.model.dilation = True
  return config
