"""``python -m conddetr_jax.convert``, as documented before the module moved to ``conddetr_jax.checkpoints.convert``."""

import runpy

if __name__ == "__main__":
  runpy.run_module("conddetr_jax.checkpoints.convert", run_name="__main__", alter_sys=True)
