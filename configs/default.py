"""Defaults shared by every run: the original's Conditional DETR R50 recipe.

Variant configs import this module and override a handful of fields. Every field a run
reads is declared here, so a typo on the command line (``--config.modle.x``) is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the full default config (Conditional DETR-R50, 50 epochs, COCO 2017)."""
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.model = ml_collections.ConfigDict(
    dict(
      backbone="resnet50",  # resnet18 | resnet34 | resnet50 | resnet101
      dilation=False,  # DC5: dilation 2 and stride 1 in layer4
      # the original's (ImageNet init); False to train them from scratch
      freeze_stem_and_layer1=True,
      # the original's; group_norm (or group_norm_ws: with weight standardisation) to train from
      # random weights
      backbone_norm="frozen_bn",
      # the original's (layer4's features); 3 or 2 stop after layer3 or layer2: stride 16 or 8, less
      # compute
      backbone_num_stages=4,
      hidden_dim=256,
      nheads=8,
      enc_layers=6,
      dec_layers=6,
      dim_feedforward=2048,
      dropout=0.1,
      num_queries=300,
      num_groups=1,  # Group DETR: K groups of num_queries train together; inference uses group 0
      num_classes=91,  # max category id + 1 (COCO: 91)
      dense_head=False,  # Co-DETR-style one-to-many head on the encoder's tokens (training only)
      aux_loss=True,
      dtype="float32",  # compute dtype: float32 | bfloat16 (params stay float32)
      decoder="conditional",  # conditional | detr (baseline for the convergence study)
      # Where the backbone zeroes the padded region before each conv and pool (models/backbone.py),
      # so each image's detections are those it gets alone and unpadded, whatever the batch and
      # bucket: eval (evaluation and prediction) | always (training as well) | never (the
      # original's padded forward, e.g. to reproduce its numbers at 2 images per GPU).
      mask_padding="eval",
      # Memory of the transformer's attention (docs/accelerators.md): dense (the original's) |
      # blockwise (keys in blocks of attention_block_size with a running softmax: memory linear
      # in the token count; the same results, attention-dropout masks drawn per block).
      attention="dense",
      attention_block_size=512,
      # what transformer layers recompute in the backward pass: none | attention | layer
      remat="none",
    )
  )

  # Initial weights: '' (ImageNet-free random init), the original's .pth, a torchvision
  # ResNet .pth (backbone only), HF .safetensors/.bin, or an Orbax checkpoint directory.
  config.init_from = ""
  config.init = ml_collections.ConfigDict(
    dict(
      skip_class_head=False,  # re-initialise the class head when num_classes differs
      # A frozen-BatchNorm backbone (backbone_norm='frozen_bn') without init_from starts from random
      # weights it cannot train well: the run warns loudly unless this says it is meant.
      allow_random_backbone=False,
    )
  )

  config.matcher = ml_collections.ConfigDict(
    dict(
      cost_class=2.0,
      cost_bbox=5.0,
      cost_giou=2.0,
      solver="hungarian",  # hungarian (exact, on device, under jit) | scipy (host callback)
    )
  )
  config.loss = ml_collections.ConfigDict(
    dict(
      ce_weight=2.0,
      bbox_weight=5.0,
      giou_weight=2.0,
      focal_alpha=0.25,
      focal_gamma=2.0,
      dense_weight=1.0,  # the dense head's terms: the decoder's weights times this
    )
  )

  config.dataset = ml_collections.ConfigDict(
    dict(
      source="coco",  # coco (json + image folder) | tfds | synthetic
      root="",  # COCO root: annotations/ and {train,val}2017/ (or images/...)
      train_ann="",  # explicit json/image folder for custom datasets
      train_images="",
      val_ann="",
      val_images="",
      tfds_name="coco/2017",
      tfds_data_dir="",
      max_boxes=100,
      strict=False,  # training: fail instead of skipping undecodable images
      train_resize="fast",  # training pixels: fast (window decode, one float resize) | pil (the
      # original's, exactly; ~2-3x the CPU); evaluation is always pil's
      train_scales=tuple(range(480, 801, 32)),
      train_max_size=1333,
      crop_resize_scales=(400, 500, 600),
      crop_min_size=384,
      crop_max_size=600,
      eval_size=800,
      eval_max_size=1333,
      size_divisibility=64,  # bucket sides are multiples of this
      buckets=(),  # () = derived from the train images' sizes; or ((h, w), ...)
      num_buckets=8,  # padded shapes when derived (each is one compiled program)
      eval_num_buckets=0,  # > 0: evaluation gets its own, finer buckets (see data/pipeline.py)
      # source=synthetic: generated shapes, which read none of the paths above (naming one is an
      # error)
      synthetic_dir="",  # where they are written ('' = a folder under ~/.cache/conddetr_jax)
      synthetic_num_train=1000,
      synthetic_num_val=200,
      synthetic_image_size=(128, 192),  # (min, max) height and width
      synthetic_object_size=(0.15, 0.45),  # (min, max) object side / the image's shorter side
      synthetic_max_objects=6,  # 1 to this many objects per image
      synthetic_max_overlap=0.35,  # the largest IoU between two boxes of an image (0: none)
      synthetic_seed=0,
      num_parallel_calls=-1,  # -1 = tf.data.AUTOTUNE
      prefetch_batches=2,
    )
  )

  config.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      backbone_lr_mult=0.1,  # backbone lr 1e-5
      weight_decay=1e-4,
      clip_grad_norm=0.1,
      warmup_steps=0,
      lr_drop_factor=0.1,
    )
  )
  # A step is one optimiser update of one global batch: total_steps, lr_drop_epoch (via steps per
  # epoch = train images // global batch), log/checkpoint/eval_every_steps, checkpoint numbers and
  # resuming all count updates, whatever grad_accum_steps is.
  config.num_epochs = 50
  config.lr_drop_epoch = 40
  config.total_steps = -1  # > 0 overrides num_epochs
  # The global batch (images per update) is fixed: 16, the original's (2 per GPU x 8 GPUs), which
  # its learning rates were set for (the DC5 configs: 8, its 1 per GPU x 8). On any device count
  # the run keeps it, each device taking micro-batches of at most per_device_batch_size images and
  # accumulating the rest (1 device: 2 x 8 accumulation steps; 8 devices: 2 x 1), or stops naming
  # the numbers to set (training/batch.py).
  config.global_batch_size = (
    16  # 0: per_device_batch_size x devices x grad_accum_steps (grows with devices)
  )
  config.per_device_batch_size = (
    2  # the largest micro-batch per device (memory), or the batch if the above is 0
  )
  # Micro-batches per update: gradients of K micro-batches are accumulated (memory of one), then
  # clipped and applied once, equal to one K-times-larger batch's (box-count normalised over it).
  # 0 = derived from the global batch as above.
  config.grad_accum_steps = 0
  config.eval_per_device_batch_size = 2
  config.parallel = "jit"  # jit (Mesh + shardings) | pmap
  # jit: split the weights, the AdamW moments and their moving average over the devices (each
  # updates its slice; XLA gathers the weights where they are used: fully sharded data parallel).
  # False keeps a full copy of them on every device. pmap always keeps a copy per device.
  config.shard_state = True

  config.log_every_steps = 50  # also the window of the speed figures (images/s, step time, MFU)
  # > 0: a jax.profiler trace of this many steps after the first (compiling) one, written to
  # <workdir>/tensorboard for TensorBoard's profile tab; on process 0 unless profile_all_processes.
  config.profile_steps = 0
  config.profile_all_processes = False
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 0  # 0 = at the end of every epoch; < 0 = only at the end
  config.keep_checkpoints = 3
  # The evaluated weights with the best value of this metric so far stay in <workdir>/best (eval.py
  # --checkpoint=<workdir>/best): AP, AP50, ..., or a class's AP/<name>; '' keeps none.
  config.keep_best = "AP"
  # Training images drawn with their boxes and class names, as the model is fed them (after
  # augmentation), to TensorBoard at the start of a run: the first N of the first batch.
  config.tensorboard_train_images = 4
  config.skip_nonfinite = False
  # > 0: keep an exponential moving average of the weights (decay min(ema_decay, (1+t)/(10+t)) at
  # update t) and evaluate it instead of the raw weights (training/ema.py); not in the original.
  config.ema_decay = 0.0
  config.rng_impl = (
    "rbg"  # dropout PRNG: rbg (XLA's generator: fast to compile and run) | threefry2x32
  )

  # Evaluation and drawn predictions (evaluation/coco_eval.py, eval.py, predict.py).
  config.evaluation = ml_collections.ConfigDict(
    dict(
      top_k=100,  # detections kept per image, as the original's PostProcess
      prediction_images=0,  # after training, draw the first N val images to <workdir>/predictions
      score_threshold=0.5,  # lowest score drawn on prediction images
      use_ema=True,  # evaluate a run's weight average where it keeps one (ema_decay > 0)
    )
  )
  return config
