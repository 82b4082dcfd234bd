"""A model's weights from any checkpoint: Orbax restores (``weights``) and conversion of the
original's PyTorch checkpoints, torchvision backbones and Hugging Face state dicts (``convert``)."""
