"""Run configurations: each module's ``get_config()`` returns an ``ml_collections.ConfigDict``.

Installed, they are ``conddetr_jax.configs``; ``NAMES`` lists them for code that looks one up by
name.
"""

NAMES = ("r50", "r50_dc5", "r101", "r101_dc5", "demo", "test_tiny")
