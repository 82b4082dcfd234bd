"""The installed package's commands: ``conddetr-train``, ``conddetr-eval``, ``conddetr-predict``,
``conddetr-aot``, ``conddetr-convert`` and ``conddetr-export`` (pyproject.toml's console scripts).

Each runs its module as ``python <script>`` would, with the same flags: train/eval/predict are the
checkout's top-level scripts (linked here so that the wheel carries them); aot, convert and export
are the package's ``conddetr_jax.aot``, ``conddetr_jax.convert`` and ``conddetr_jax.export``.
Running the module, not importing a function, keeps each command's flags defined only when that
command runs.
"""

import runpy


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """``conddetr-train``: ``python train.py``."""
  _run("conddetr_jax.commands.train")


def evaluate() -> None:
  """``conddetr-eval``: ``python eval.py``."""
  _run("conddetr_jax.commands.eval")


def predict() -> None:
  """``conddetr-predict``: ``python predict.py``."""
  _run("conddetr_jax.commands.predict")


def aot() -> None:
  """``conddetr-aot``: ``python -m conddetr_jax.aot``."""
  _run("conddetr_jax.aot")


def convert() -> None:
  """``conddetr-convert``: ``python -m conddetr_jax.convert``."""
  _run("conddetr_jax.convert")


def export() -> None:
  """``conddetr-export``: ``python -m conddetr_jax.export``."""
  _run("conddetr_jax.export")
