"""config.keep_best: the best evaluated weights kept apart, across a resume, read back by eval.py's
loader; a metric evaluation does not report is refused before training."""

import jax
import numpy as np
import pytest

from conddetr_jax import models
from conddetr_jax.checkpoints import weights
from conddetr_jax.training import best_checkpoint, loop
from configs import test_tiny


@pytest.fixture(scope="module")
def variables():
  """Four different sets of the tiny model's variables (host arrays)."""
  config = test_tiny.get_config()
  model = models.build_model(config)
  first = jax.device_get(models.init_variables(model, jax.random.PRNGKey(0)))
  return [jax.tree.map(lambda x, k=k: x + k, first) for k in range(4)]


def _params_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a["params"], b["params"])))


def test_best_weights_survive_a_resume_and_load_like_any_checkpoint(tmp_path, variables):
  workdir = str(tmp_path)
  best = best_checkpoint.BestCheckpoint(workdir, "AP")
  assert best.offer(3, variables[0], {"AP": 0.20, "AP50": 0.5})
  assert not best.offer(6, variables[1], {"AP": 0.10, "AP50": 0.9})  # AP50 does not rank
  best.close()

  resumed = best_checkpoint.BestCheckpoint(workdir, "AP")  # a resumed run reads the kept record
  assert resumed.best == {"step": 3, "metric": "AP", "value": 0.20}
  assert not resumed.offer(9, variables[2], {"AP": 0.15})
  loaded, step = weights.load_variables(test_tiny.get_config(), str(tmp_path / "best"))
  assert step == 3 and _params_equal(loaded, variables[0])

  assert resumed.offer(12, variables[3], {"AP": 0.30})
  resumed.close()
  loaded, step = weights.load_variables(test_tiny.get_config(), str(tmp_path / "best"))
  assert step == 12 and _params_equal(loaded, variables[3])
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["12"]  # one kept


def test_a_resume_ranking_by_another_metric_replaces_the_kept_weights(tmp_path, variables):
  best = best_checkpoint.BestCheckpoint(str(tmp_path), "AP")
  best.offer(3, variables[0], {"AP": 0.5, "AP50": 0.9})
  best.close()
  by_ap50 = best_checkpoint.BestCheckpoint(str(tmp_path), "AP50")
  assert by_ap50.best is None
  assert by_ap50.offer(6, variables[1], {"AP": 0.1, "AP50": 0.2})
  by_ap50.close()


def test_keep_best_must_name_a_metric_evaluation_reports():
  categories = {1: "circle", 2: "square"}
  best_checkpoint.check_metric("AP/square", categories)
  best_checkpoint.check_metric("", categories)
  with pytest.raises(ValueError, match=r"config.keep_best='mAP'.*AP, AP50.*AP/circle"):
    best_checkpoint.check_metric("mAP", categories)


def test_train_refuses_an_unknown_keep_best_before_anything_compiles(tmp_path):
  config = test_tiny.get_config()
  config.dataset.synthetic_dir = str(tmp_path / "synthetic")
  config.dataset.synthetic_num_train = 4
  config.dataset.synthetic_num_val = 2
  config.keep_best = "mAP"
  with pytest.raises(ValueError, match="config.keep_best='mAP'"):
    loop.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert not (tmp_path / "workdir" / "checkpoints").exists()
