"""config.init_from: initial weights from an Orbax folder or a PyTorch-world file."""

import jax
import numpy as np
import pytest

from conddetr_jax import models, sharding
from conddetr_jax.checkpoints import convert, weights
from conddetr_jax.training import loop
from tests.test_model import tiny_config


@pytest.fixture(name="saved", scope="module")
def fixture_saved(tmp_path_factory):
  """The tiny model's variables (seed 1), and the Orbax folder they are saved in."""
  variables = convert.init_variables(tiny_config(), seed=1)
  return variables, convert.save_variables(
    variables, tmp_path_factory.mktemp("init_from") / "weights"
  )


def test_init_from_an_orbax_folder_restores_the_saved_variables(saved):
  variables, path = saved
  config = tiny_config()
  fresh = convert.init_variables(config, seed=2)
  loaded = weights.load_initial_weights(path, config, fresh)
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(variables)
  )


def test_init_from_a_missing_file_names_it(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    weights.load_initial_weights(
      str(tmp_path / "nope.pth"), config, convert.init_variables(config, abstract=True)
    )


def test_a_training_run_starts_from_the_init_from_weights(saved):
  variables, path = saved
  config = tiny_config()
  config.init_from = path
  model = models.build_model(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  start = loop._initial_state(  # pylint: disable=protected-access
    config, model, lambda fresh: fresh, jax.random.PRNGKey(2), sharding.replicated(mesh)
  )
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(start), jax.device_get(variables)
  )
