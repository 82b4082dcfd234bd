"""conddetr-jax: Conditional DETR (Meng et al., ICCV 2021) in JAX/Flax.

Importing the package has no side effects; submodules are imported explicitly, e.g.
``from conddetr_jax import models, losses``.
"""

__version__ = "0.1.0"
