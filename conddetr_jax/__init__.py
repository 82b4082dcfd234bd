"""conddetr-jax: Conditional DETR (Meng et al., ICCV 2021) in JAX/Flax.

Importing the package has no side effects and loads neither JAX nor TensorFlow; submodules are
imported explicitly, e.g. ``from conddetr_jax.criterion import losses``. The Python API
(``conddetr_jax.inference.api``) is reachable from here and loads on first use:

  detector = conddetr_jax.load_detector("demo", "/tmp/conddetr_demo")
  boxes, scores, labels = detector("photo.jpg")
"""

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "load_detector"]


def __getattr__(name: str):
  """``conddetr_jax.load_detector`` and friends, imported when first asked for (PEP 562), so that
  ``import conddetr_jax`` stays cheap."""
  if name in __all__:
    from conddetr_jax.inference import api  # pylint: disable=import-outside-toplevel

    return getattr(api, name)
  raise AttributeError(f"module 'conddetr_jax' has no attribute {name!r}")
