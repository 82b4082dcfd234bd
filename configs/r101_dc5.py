r"""Conditional DETR-DC5-R101, 50 epochs (the original's 45.0 AP on COCO val2017).

The original's recipe (its scripts/conddetr_r101dc5_epoch50.sh) is its DC5-R50 recipe with the
ResNet-101 backbone: configs/r50_dc5.py says what that recipe is and how it runs here.

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet101-63fe2227.pth
  python train.py --config=configs/r101_dc5.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet101-63fe2227.pth
"""

import ml_collections

from conddetr_jax.configs import r50_dc5


def get_config() -> ml_collections.ConfigDict:
  """DC5-R101: the DC5-R50 recipe with the ResNet-101 backbone."""
  config = r50_dc5.get_config()
  config.model.backbone = "resnet101"
  return config
