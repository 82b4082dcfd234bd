"""A dataset source that cannot be honoured is an error: a synthetic config never silently ignores
the user's paths, and never writes its shapes into a folder named for the user's own data."""

import os

import pytest

from conddetr_jax import data
from conddetr_jax.data import coco
from configs import demo, test_tiny


@pytest.mark.parametrize("field", coco.USER_DATA_FIELDS)
def test_a_synthetic_config_given_a_path_to_user_data_names_the_flag_that_reads_files(
  tmp_path, field
):
  config = demo.get_config()
  config.dataset[field] = str(tmp_path / "mine")
  message = (
    rf"^config.dataset.{field}='{tmp_path}/mine': this config's dataset.source='synthetic' "
    r"generates its own images \(under config.dataset.synthetic_dir\) and reads no files; add "
    r"--config.dataset.source=coco to use COCO-format files$"
  )
  with pytest.raises(ValueError, match=message):
    data.prepare_dataset(config)  # training
  with pytest.raises(ValueError, match=message):
    data.annotation_path(config, "val")  # evaluation's ground truth
  assert os.listdir(tmp_path) == []  # and nothing was written there


def test_a_synthetic_config_given_a_dataset_root_does_not_create_it(tmp_path):
  config = demo.get_config()
  config.dataset.root = str(tmp_path / "nonexistent")
  with pytest.raises(ValueError, match=r"--config.dataset.source=coco"):
    data.prepare_dataset(config)
  assert not os.path.exists(tmp_path / "nonexistent")


def test_the_synthetic_dataset_goes_to_its_own_cache_folder_or_synthetic_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  config = test_tiny.get_config()
  config.dataset.update(synthetic_num_train=2, synthetic_num_val=1)
  data.prepare_dataset(config)
  (generated,) = os.listdir(tmp_path / "cache" / "conddetr_jax")
  assert generated.startswith("synthetic_")
  assert coco.resolve_split(config, "val") == (
    str(tmp_path / "cache" / "conddetr_jax" / generated / "annotations" / "instances_val2017.json"),
    str(tmp_path / "cache" / "conddetr_jax" / generated / "val2017"),
  )
  config.dataset.synthetic_dir = str(tmp_path / "shapes")
  data.prepare_dataset(config)
  assert sorted(os.listdir(tmp_path / "shapes" / "val2017")) == ["000000000001.jpg"]
