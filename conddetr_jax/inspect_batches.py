"""``python -m conddetr_jax.inspect_batches``, as documented before the module moved to ``conddetr_jax.data.inspect_batches``."""

import runpy

if __name__ == "__main__":
  runpy.run_module("conddetr_jax.data.inspect_batches", run_name="__main__", alter_sys=True)
