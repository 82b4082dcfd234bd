"""What the model sees: draws augmented training batches with their boxes and class names.

Usage:
  python -m conddetr_jax.inspect_batches --config=configs/r50.py --config.dataset.root=/data/coco \
      --out=batch.png [--batch_size=8] [--step=0] [--split=train]

Padding (``pad_mask``) is drawn dark, each box in a colour of its class with its name.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow loads (the data package imports it)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from conddetr_jax.data import coco, inspect_batches, pipeline

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "batch.png", "Output PNG.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images to draw.")
_STEP = flags.DEFINE_integer("step", 0, "Global training step of the batch (train split).")
_SPLIT = flags.DEFINE_enum(
  "split", "train", ["train", "val"], "train: augmented; val: eval resize."
)


def main(argv: list[str]) -> None:
  """Draws the batch of ``--step`` to ``--out``."""
  del argv
  config = _CONFIG.value
  coco.prepare_dataset(config)
  if _SPLIT.value == "train":
    it = pipeline.train_iterator(
      config,
      global_batch_size=_BATCH_SIZE.value,
      start_step=_STEP.value,
      process_index=0,
      process_count=1,
    )
  else:
    it = pipeline.eval_iterator(
      config, global_batch_size=_BATCH_SIZE.value, process_index=0, process_count=1
    )
  batch = next(it)
  inspect_batches.render_batch(batch, coco.category_names(config)).save(_OUT.value)
  print(
    f"Wrote {_OUT.value}: {batch['image'].shape[0]} images padded to {batch['image'].shape[1:3]}, "
    f"{int(batch['box_valid'].sum())} boxes"
  )


if __name__ == "__main__":
  cli.run(main)
