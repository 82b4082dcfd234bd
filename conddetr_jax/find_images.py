"""``python -m conddetr_jax.find_images``, as documented before the module moved to ``conddetr_jax.data.find_images``."""

import runpy

if __name__ == "__main__":
  runpy.run_module("conddetr_jax.data.find_images", run_name="__main__", alter_sys=True)
