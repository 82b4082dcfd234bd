"""Training: optimiser, train state, sharded train step, checkpoints, and the run loop.

Submodules are imported explicitly (``from conddetr_jax.training import loop``), so a test of the
optimiser does not pull in the data pipeline. ``loop.train_and_evaluate(config, workdir)`` is the
whole run; ``train.py`` only parses flags.
"""
