r"""Conditional DETR-DC5-R50, 50 epochs (the original's 43.7 AP on COCO val2017).

The original's recipe (its scripts/conddetr_r50dc5_epoch50.sh): 1 image per GPU on 8 GPUs,
a global batch of 8 with every image unpadded; the R50 recipe's learning rates, 50 epochs and the
drop at epoch 40 (so twice the R50 recipe's updates). Here the global batch is 8 on any device
count, and training masks the padding (``mask_padding="always"``): each image is trained as if
alone, as there, whatever the images per device.

Command (from torchvision's ImageNet weights, as the original; a plain download, no torchvision
needed):
  wget https://download.pytorch.org/models/resnet50-0676ba61.pth
  python train.py --config=configs/r50_dc5.py --workdir=DIR --config.dataset.root=/path/to/coco \
      --config.init_from=resnet50-0676ba61.pth
"""

import ml_collections

from conddetr_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  """DC5-R50: the defaults with another backbone/dilation, the original's DC5 batch, masked."""
  config = default.get_config()
  config.model.backbone = "resnet50"
  config.model.dilation = True
  config.model.mask_padding = "always"
  config.global_batch_size = 8
  return config
