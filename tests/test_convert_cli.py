"""`python -m conddetr_jax.convert`: the original's .pth -> an Orbax checkpoint that eval.py
restores."""

import argparse
import subprocess

import jax
import ml_collections
import numpy as np
import pytest
import torch

from conddetr_jax.checkpoints import convert, weights
from configs import default
from tests import hf_reference, processes

SMALL = dict(
  num_queries=10,
  num_classes=7,
  encoder_layers=1,
  decoder_layers=2,
  encoder_ffn_dim=64,
  decoder_ffn_dim=64,
)
MODEL = dict(num_queries=10, num_classes=7, enc_layers=1, dec_layers=2, dim_feedforward=64)
OVERRIDES = [f"--config.model.{name}={value}" for name, value in MODEL.items()]


def small_config() -> ml_collections.ConfigDict:
  """The R50 defaults with ``MODEL``'s small transformer."""
  config = default.get_config()
  config.model.update(MODEL)
  return config


def convert_cli(*flags: str) -> subprocess.CompletedProcess:
  """``python -m conddetr_jax.convert --config=configs/r50.py *flags``."""
  return processes.run_python("-m", "conddetr_jax.convert", "--config=configs/r50.py", *flags)


@pytest.fixture(scope="module")
def original_state():
  """The original-layout state dict of a small reference model (HF's, random weights)."""
  return hf_reference.original_state_dict(hf_reference.build_reference("resnet50", seed=5, **SMALL))


def test_cli_writes_a_checkpoint_that_inference_restores_exactly(tmp_path, original_state):
  state = original_state
  pth = tmp_path / "conddetr_small.pth"
  torch.save(
    {"model": {k: torch.from_numpy(v) for k, v in state.items()}, "args": argparse.Namespace()}, pth
  )
  out = tmp_path / "converted"
  flags = [*OVERRIDES, f"--torch={pth}", f"--out={out}"]
  result = convert_cli(*flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval.py" in result.stdout
  restored, step = weights.load_variables(small_config(), str(out))
  assert step is None
  expected = convert.from_torch(state, small_config())
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, expected)

  again = convert_cli(*flags)  # the same command: its output folder now exists
  assert again.returncode != 0 and "exists" in again.stderr


def test_cli_reports_a_missing_file_and_a_wrong_model(tmp_path, original_state):
  missing = convert_cli(f"--torch={tmp_path / 'nope.pth'}", f"--out={tmp_path / 'o'}")
  assert missing.returncode != 0 and "nope.pth" in missing.stderr
  state = original_state
  pth = tmp_path / "small.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
  wrong = convert_cli(f"--torch={pth}", f"--out={tmp_path / 'o'}")
  assert wrong.returncode != 0
  assert "missing keys" in wrong.stderr and "skip_class_head" in wrong.stderr


def test_a_one_group_checkpoint_loads_into_a_group_detr_model_with_fresh_extra_groups(
  original_state,
):
  config = small_config()
  config.model.num_groups = 3
  variables = convert.from_torch(original_state, config)
  one_group = convert.from_torch(original_state, small_config())
  extra = variables["params"].pop("group_query_embed")
  assert (
    extra.shape == (2 * 10, 256) and np.all(np.isfinite(extra)) and np.std(extra) > 0.5
  )  # normal(1) init
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, variables, one_group
  )  # the rest: the checkpoint's


def test_a_checkpoint_without_the_dense_head_loads_into_a_model_with_a_fresh_one(original_state):
  config = small_config()
  config.model.dense_head = True
  variables = convert.from_torch(original_state, config)
  head = {name: variables["params"].pop(name) for name in ("dense_class_embed", "dense_bbox_embed")}
  assert np.std(head["dense_class_embed"]["kernel"]) > 0 and np.all(
    head["dense_bbox_embed"]["layers_2"]["kernel"] == 0
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, variables, convert.from_torch(original_state, small_config())
  )
