"""Export of a trained detector for serving: StableHLO (``jax.export``), a TF SavedModel, ONNX.

``python -m conddetr_jax.export --config=... --checkpoint=... --out=DIR --format=...`` writes
the artifacts and checks each against the JAX model (docs/export.md). One job per module:
``forward`` (the model as a function of flat weights, and the padded sizes it is exported at),
``stablehlo``, ``saved_model``, ``onnx`` (one format each), ``verify`` (artifact vs the model).
"""
