"""Hugging Face transformers' PyTorch Conditional DETR train step, the peer the benchmarks time JAX
against (benchmarks/train_step.py on the CPU, benchmarks/accelerator.py on a GPU). A module of its
own so that both can import it: the benchmarks define their command-line flags when imported.
"""

import os

import numpy as np

from conddetr_jax.models import backbone as backbone_lib


def build_hf_step(
  config, batch: dict[str, np.ndarray], device: str = "cpu", autocast_bf16: bool = False
):
  """HF ConditionalDetr's train step (loss with its matcher, backward, clip, AdamW) as ``run()``.

  ``device``: PyTorch's device for the model and the batch ("cpu", "cuda"); ``run()`` waits for the
  device, so that it can be timed. ``autocast_bf16``: the forward and loss under
  ``torch.autocast(bfloat16)`` (PyTorch's mixed precision: the float32 weights and optimizer stay).

  Same sizes as ``config.model`` (HF's own ResNet-18/34/50/101, so no timm/torchvision, without
  DC5), the same trainable set (layer2-4 and the transformer as the original, or the whole
  backbone when ``freeze_stem_and_layer1`` is False) and optimiser groups. For
  ``backbone_norm='group_norm'`` (the demo) HF's frozen BatchNorm layers become
  ``torch.nn.GroupNorm`` with the same group count, so PyTorch does the same work.
  """
  import torch  # pylint: disable=g-import-not-at-top

  # Importing it declares the torchvision ops that PyPI's CUDA torchvision wheel fails to
  # register next to the CPU torch, which transformers' import of torchvision needs: it must
  # come first (the split keeps the import sorter from moving it).
  import tests.conftest  # pylint: disable=g-import-not-at-top,unused-import

  # isort: split
  from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

  from tests import hf_reference

  m = config.model
  if (
    m.backbone not in backbone_lib.RESNET_SPECS
    or m.dilation
    or m.backbone_num_stages != 4
    or m.backbone_norm == "group_norm_ws"
    or m.dense_head
  ):
    raise ValueError(
      "the HF comparison is built for config.model.backbone in "
      f"{sorted(backbone_lib.RESNET_SPECS)} "
      "with all 4 stages, without dilation, weight standardisation or dense head, got "
      f"{m.backbone!r} with backbone_num_stages={m.backbone_num_stages}, dilation={m.dilation}, "
      f"backbone_norm={m.backbone_norm}, dense_head={m.dense_head} (for the demo add "
      "--config.model.backbone_num_stages=4 --config.model.dilation=False "
      "--config.model.backbone_norm=group_norm --config.model.enc_layers=2 "
      "--config.model.dense_head=False; "
      "--config.model.dim_feedforward=1024 --config.model.num_queries=50 for the stride-32 demo's "
      "model in full)"
    )
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset)
  kind, depths = backbone_lib.RESNET_SPECS[m.backbone]
  expansion = 1 if kind == "basic" else 4
  resnet = ResNetConfig(
    layer_type=kind,
    depths=list(depths),
    out_features=["stage4"],
    hidden_sizes=[w * expansion for w in backbone_lib.STAGE_WIDTHS],
  )
  hf_config = ConditionalDetrConfig(
    backbone_config=resnet,
    num_labels=m.num_classes,
    num_queries=m.num_queries,
    **hf_reference.transformer_sizes(m),
    dropout=m.dropout,
    auxiliary_loss=m.aux_loss,
  )
  model = ConditionalDetrForObjectDetection(hf_config).train().to(device)
  if m.backbone_norm == "group_norm":
    for parent in list(model.model.backbone.modules()):
      for child_name, child in parent.named_children():
        if type(child).__name__ == "ConditionalDetrFrozenBatchNorm2d":
          norm = torch.nn.GroupNorm(backbone_lib.GROUP_NORM_GROUPS, child.weight.numel(), eps=1e-5)
          setattr(parent, child_name, norm)
  backbone, rest = [], []
  for name, p in model.named_parameters():
    if "backbone" in name:
      # HF's own test ("stage.1" in name) never matches HF ResNet's "stages.1": train layer2-4 as
      # the original.
      p.requires_grad_(
        not m.freeze_stem_and_layer1 or any(f"stages.{i}." in name for i in (1, 2, 3))
      )
      if p.requires_grad:
        backbone.append(p)
    else:
      rest.append(p)
  opt = config.optimizer
  adamw = torch.optim.AdamW(
    [{"params": rest}, {"params": backbone, "lr": opt.lr * opt.backbone_lr_mult}],
    lr=opt.lr,
    weight_decay=opt.weight_decay,
  )
  pixels = torch.tensor(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
  pixel_mask = torch.tensor(~batch["pad_mask"]).long().to(device)
  labels = [
    {"class_labels": torch.tensor(l[v]).long().to(device), "boxes": torch.tensor(b[v]).to(device)}
    for l, b, v in zip(batch["labels"], batch["boxes"], batch["box_valid"])
  ]
  params = [p for p in model.parameters() if p.requires_grad]
  device_type = torch.device(device).type

  def run():
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast_bf16):
      loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
    adamw.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt.clip_grad_norm)
    adamw.step()
    if device_type == "cuda":  # CUDA runs asynchronously: the step ends when the GPU is done
      torch.cuda.synchronize()

  return run
