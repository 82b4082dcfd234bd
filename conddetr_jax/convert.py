"""Converts the original's (or torchvision's, or Hugging Face's) PyTorch checkpoint into an Orbax
one.

  python -m conddetr_jax.convert --config=configs/r50.py --torch=ConditionalDETR_r50_epoch50.pth \
      --out=DIR

The conversion itself is ``conddetr_jax.checkpoints.convert``; this module is the command.
"""

from conddetr_jax import cli

cli.quiet_native_logs()  # before TensorFlow and JAX load

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import jax
from ml_collections import config_flags

from conddetr_jax.checkpoints import convert

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file of the model, e.g. configs/r50.py."
)
_TORCH = flags.DEFINE_string(
  "torch", None, "The original's .pth, a torchvision ResNet .pth, or HF .safetensors/.bin."
)
_OUT = flags.DEFINE_string("out", None, "Output folder for the Orbax checkpoint (must not exist).")
flags.mark_flags_as_required(["config", "torch", "out"])


def main(argv: list[str]) -> None:
  """Converts ``--torch`` for ``--config``'s model and writes it to ``--out``."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  variables = convert.from_torch(_TORCH.value, _CONFIG.value)
  path = convert.save_variables(variables, _OUT.value)
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  cli.print_summary(
    f"Converted {_TORCH.value} ({count / 1e6:.1f}M parameters)",
    {
      "checkpoint": path,
      "evaluate it with": f"python eval.py --config={flags.FLAGS['config'].config_filename} "
      f"--checkpoint={path} --workdir=DIR",
    },
  )


if __name__ == "__main__":
  cli.run(main)
