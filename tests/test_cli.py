"""eval.py and predict.py as a user runs them: outputs on disk, and clear errors."""

import json
import os
import shutil
import subprocess

import jax
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from conddetr_jax import data, models
from conddetr_jax.checkpoints import convert, weights
from conddetr_jax.data import image_files
from conddetr_jax.evaluation import checkpoint_eval, coco_eval
from conddetr_jax.inference import prediction
from conddetr_jax.training import checkpoint, optimizer
from conddetr_jax.training import state as state_lib
from configs import test_tiny
from tests import processes

STEP = 5


def run(script: str, *args: str) -> subprocess.CompletedProcess:
  return processes.run_python(script, *args, env=processes.cpu_env())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny synthetic dataset, and a training workdir whose latest checkpoint is step 5."""
  root = str(tmp_path_factory.mktemp("synthetic"))
  config = test_tiny.get_config()
  config.dataset.update(synthetic_dir=root, synthetic_num_val=6)
  data.prepare_dataset(config)
  model = models.build_model(config)
  variables = models.init_variables(model, jax.random.PRNGKey(3))
  tx = optimizer.build_optimizer(
    config, variables["params"], optimizer.learning_rate_schedule(config, 10)
  )
  state = state_lib.create_train_state(variables, tx, state_lib.dropout_key_data(config))
  workdir = tmp_path_factory.mktemp("run")
  checkpointer = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=2, asynchronous=False)
  for step in (2, STEP):
    checkpointer.save(step, state.replace(step=np.int32(step)), {"step": step})
  checkpointer.close()
  flags = [
    "--config=configs/test_tiny.py",
    f"--config.dataset.synthetic_dir={root}",
    "--config.dataset.synthetic_num_val=6",
  ]
  return config, model, variables, str(workdir), flags


def test_eval_cli_prints_the_table_and_writes_detections_and_metrics(setup, tmp_path):
  config, _, _, workdir, flags = setup
  out = tmp_path / "eval"
  proc = run("eval.py", *flags, f"--checkpoint={workdir}", f"--workdir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("Average Precision") == 6 and proc.stdout.count("Average Recall") == 6
  with open(out / "detections.json") as f:
    detections = json.load(f)
  assert len(detections) == 6 * coco_eval.top_k(config)
  with open(out / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 1 and records[0]["step"] == STEP and records[0]["split"] == "val"
  assert records[0]["checkpoint"] == workdir
  assert all(-1.0 <= records[0][k] <= 1.0 for k in coco_eval.METRIC_NAMES)


def test_predict_cli_writes_a_png_and_a_json_per_image(setup, tmp_path):
  _, _, _, workdir, flags = setup
  photo = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 110, 4), np.uint8), "RGBA").save(
    photo
  )
  val_image = os.path.join(setup[0].dataset.synthetic_dir, "val2017", "000000000001.jpg")
  out = tmp_path / "out"
  proc = run(
    "predict.py",
    *flags,
    f"--checkpoint={workdir}/checkpoints/{STEP}",
    f"--out={out}",
    "--threshold=0.0",
    str(photo),
    val_image,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "detections.json") as f:
    records = json.load(f)
  assert [os.path.basename(r["file"]) for r in records] == ["photo.png", "000000000001.jpg"]
  assert (records[0]["height"], records[0]["width"]) == (70, 110)
  for record in records:
    with Image.open(record["png"]) as png:
      scale = 512 // max(record["width"], record["height"])  # small images are drawn enlarged
      assert png.format == "PNG" and png.size == (record["width"] * scale, record["height"] * scale)
    scores = [d["score"] for d in record["detections"]]
    assert len(scores) == 100 and scores == sorted(scores, reverse=True)
    assert {d["name"] for d in record["detections"]} <= {"square", "disc", "triangle", "cross"} | {
      f"class {i}" for i in range(10)
    }


def test_predict_cli_takes_a_config_name_and_draws_above_the_config_s_threshold(setup, tmp_path):
  _, _, _, workdir, flags = setup
  val_image = os.path.join(setup[0].dataset.synthetic_dir, "val2017", "000000000001.jpg")
  out = tmp_path / "out"
  # A name as the Python API takes it; no --threshold: the config's (0 here: every detection).
  named = ["--config=test_tiny", *flags[1:], "--config.evaluation.score_threshold=0.0"]
  proc = run("predict.py", *named, f"--checkpoint={workdir}", f"--out={out}", val_image)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Drew the detections scoring >= 0 on 1 images" in proc.stdout
  with open(out / "detections.json") as f:
    [record] = json.load(f)
  assert len(record["detections"]) == 100


def test_predict_cli_names_a_missing_image_before_it_loads_the_model(setup, tmp_path):
  _, _, _, _, flags = setup
  missing = str(tmp_path / "no_such_photo.jpg")
  # The checkpoint is missing too: the image's error shows that it was checked first.
  proc = run(
    "predict.py", *flags, f"--checkpoint={tmp_path / 'no_such_run'}", f"--out={tmp_path}", missing
  )
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
    f"error: image not found: {missing}"
  ]


_LOAD_DETECTOR = """
import sys
import conddetr_jax
from configs import test_tiny
config = test_tiny.get_config()
config.dataset.synthetic_dir = sys.argv[2]
print(conddetr_jax.load_detector(config, sys.argv[1]).threshold)
"""


def test_the_python_api_loads_a_training_workdir_with_nothing_on_the_console(setup):
  config, _, _, workdir, _ = setup
  env = {
    k: v for k, v in os.environ.items() if not k.startswith("TF_")
  }  # as in a user's own program
  proc = processes.run_python_ok(
    "-c", _LOAD_DETECTOR, workdir, config.dataset.synthetic_dir, env=env
  )
  assert proc.stdout == f"{config.evaluation.score_threshold}\n" and proc.stderr == ""


def _photograph_folder(root) -> list[tuple[int, int]]:
  """A COCO-layout folder of real photographs: matplotlib's grace_hopper.jpg (512x600), a crop of
  it and a grayscale copy, each annotated with one box. Returns the (height, width) per image id."""
  source = os.path.join(
    os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"
  )
  with Image.open(source) as photo:
    photos = [
      photo.convert("RGB"),
      photo.crop((100, 50, 500, 350)).convert("RGB"),
      photo.convert("L"),
    ]
  images, annotations = [], []
  for split in ("train", "val"):
    os.makedirs(root / f"{split}2017")
    for image_id, photo in enumerate(photos, start=1):
      photo.save(root / f"{split}2017" / f"{image_id:012d}.jpg", "JPEG", quality=92)
  for image_id, photo in enumerate(photos, start=1):
    w, h = photo.size
    images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
    annotations.append(
      {
        "id": image_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [w * 0.2, h * 0.1, w * 0.6, h * 0.8],
        "area": w * h * 0.48,
      }
    )
  content = {
    "images": images,
    "annotations": annotations,
    "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
  }
  os.makedirs(root / "annotations")
  for split in ("train", "val"):
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
      json.dump(content, f)
  return [(photo.size[1], photo.size[0]) for photo in photos]


def test_eval_and_predict_work_on_a_coco_folder_of_real_photographs(setup, tmp_path):
  _, _, _, workdir, _ = setup
  root = tmp_path / "photos"
  sizes = _photograph_folder(root)
  flags = [
    "--config=configs/test_tiny.py",
    "--config.dataset.source=coco",
    f"--config.dataset.root={root}",
  ]
  proc = run("eval.py", *flags, f"--checkpoint={workdir}", f"--workdir={tmp_path / 'eval'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "eval" / "detections.json") as f:
    detections = json.load(f)
  assert sorted({d["image_id"] for d in detections}) == [1, 2, 3]
  for d in detections:  # xywh in the original photograph's pixels (centres inside it; as in the
    h, w = sizes[d["image_id"] - 1]  # original, boxes are not clipped to the image)
    x, y, bw, bh = d["bbox"]
    assert 0 <= x + bw / 2 <= w + 1e-3 and 0 <= y + bh / 2 <= h + 1e-3 and bw >= 0 and bh >= 0
  assert (
    max(d["bbox"][0] + d["bbox"][2] / 2 for d in detections) > 64
  )  # not the resized 64 px input

  proc = run(
    "predict.py",
    *flags,
    f"--checkpoint={workdir}",
    f"--out={tmp_path / 'pred'}",
    "--threshold=0.0",
    str(root / "val2017" / "000000000003.jpg"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "pred" / "detections.json") as f:
    [record] = json.load(f)
  assert (record["height"], record["width"]) == sizes[2]
  with Image.open(record["png"]) as png:
    assert png.format == "PNG" and png.size == (512, 600) and png.mode == "RGB"  # (width, height)
  # Class names come from this dataset's json: id 1 is "person", the others have no name.
  assert {d["name"] for d in record["detections"]} <= {"person"} | {f"class {i}" for i in range(10)}


def test_missing_checkpoint_is_a_one_line_error(setup, tmp_path):
  _, _, _, _, flags = setup
  proc = run("eval.py", *flags, f"--checkpoint={tmp_path}/nope", f"--workdir={tmp_path}/out")
  assert proc.returncode != 0 and f"error: checkpoint not found: {tmp_path}/nope" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unknown_config_field_is_named(setup, tmp_path):
  _, _, _, workdir, flags = setup
  proc = run(
    "eval.py",
    *flags,
    "--config.model.hiden_dim=64",
    f"--checkpoint={workdir}",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert (
    "error: --config.model.hiden_dim: config.model has no field 'hiden_dim'; did you mean "
    "hidden_dim?" in proc.stderr.splitlines()
  )


# The other errors, raised by the library functions the scripts call (they print them as
# "error: <message>" and exit 1, as the missing checkpoint above).


def test_dataset_root_without_annotations_is_named(setup, tmp_path):
  config, _, _, workdir, _ = setup
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.update(source="coco", root=str(tmp_path))
  with pytest.raises(
    FileNotFoundError, match=f"Annotation file not found: {tmp_path}/annotations/instances_"
  ):
    checkpoint_eval.evaluate_checkpoint(config, workdir, str(tmp_path / "out"))


def test_missing_val_image_is_named(setup, tmp_path):
  config, _, _, workdir, _ = setup
  root = tmp_path / "broken"
  shutil.copytree(config.dataset.synthetic_dir, root)
  os.remove(root / "val2017" / "000000000004.jpg")
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.update(source="coco", root=str(root))
  with pytest.raises(data.BadImageError, match="val2017/000000000004.jpg"):
    checkpoint_eval.evaluate_checkpoint(config, workdir, str(tmp_path / "out"))


def test_unreadable_image_is_named(setup, tmp_path):
  config = setup[0]
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match=f"cannot read image {bad}"):
    image_files.load_image(str(bad), config)
  with pytest.raises(FileNotFoundError, match=f"image not found: {tmp_path}/none.jpg"):
    image_files.load_image(str(tmp_path / "none.jpg"), config)


# ------------------------------------------------------------------ checkpoint paths (in-process)


def test_checkpoint_paths_resolve_to_the_variables_tree(setup, tmp_path):
  config, _, variables, workdir, _ = setup
  latest = os.path.join(workdir, "checkpoints", str(STEP), "state")
  assert weights.resolve_orbax_checkpoint(workdir) == latest
  assert weights.resolve_orbax_checkpoint(os.path.join(workdir, "checkpoints")) == latest
  assert weights.resolve_orbax_checkpoint(os.path.join(workdir, "checkpoints", "2")).endswith(
    "/2/state"
  )
  # An Orbax tree of just the variables (what the converter writes).
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "converted"), variables)
  assert weights.resolve_orbax_checkpoint(str(tmp_path / "converted")) == str(
    tmp_path / "converted"
  )
  restored, step = weights.load_variables(config, str(tmp_path / "converted"))
  assert step is None
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    weights.resolve_orbax_checkpoint(str(tmp_path))


def test_a_training_checkpoint_restores_the_saved_variables(setup):
  config, _, variables, workdir, _ = setup
  restored, step = weights.load_variables(config, workdir)
  assert step == STEP
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))


def test_a_group_norm_model_saves_and_restores_without_batch_stats(tmp_path):
  config = test_tiny.get_config()
  config.model.update(
    backbone_norm="group_norm", freeze_stem_and_layer1=False
  )  # the demo's backbone
  variables = models.init_variables(models.build_model(config), jax.random.PRNGKey(1))
  assert set(variables) == {"params"}
  path = convert.save_variables(variables, tmp_path / "group_norm")
  restored, step = weights.load_variables(config, path)
  assert step is None and set(restored) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))


def test_a_checkpoint_of_another_model_is_a_clear_error(setup):
  config, _, _, workdir, _ = setup
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.num_classes = 91
  with pytest.raises(
    ValueError,
    match=r"does not fit(.|\n)*params/class_embed/kernel: checkpoint \(32, 10\), "
    r"model \(32, 91\)",
  ):
    weights.load_variables(other, workdir)


def test_image_files_are_resized_as_in_evaluation_and_padded(setup, tmp_path):
  config = setup[0]  # eval_size 64, eval_max_size 64, size_divisibility 32
  path = tmp_path / "flat.png"
  Image.fromarray(np.full((100, 150, 3), (124, 116, 104), np.uint8)).save(
    path
  )  # ~ the ImageNet mean
  loaded = image_files.load_image(str(path), config)
  assert loaded.pixels.shape == (100, 150, 3) and loaded.orig_size.tolist() == [[100, 150]]
  assert loaded.image.shape == (1, 64, 64, 3) and loaded.pad_mask.shape == (1, 64, 64)
  # Shorter side 64 would make the longer one 96 > 64: the longer side is capped at 64 instead.
  assert not loaded.pad_mask[0, :43, :64].any() and loaded.pad_mask[0, 43:].all()
  np.testing.assert_allclose(loaded.image[0, :43], 0.0, atol=0.02)
  assert (loaded.image[0, 43:] == 0).all()


def test_predict_names_the_best_score_and_a_threshold_that_shows_it_when_nothing_passes():
  record = {"file": "/img/a.jpg", "png": "/out/a.png", "best_score": 0.4812, "detections": []}
  assert prediction.describe_record(record, 0.5) == (
    "/img/a.jpg: no detection scores >= 0.5 (the best scores 0.481); try --threshold=0.4"
  )
  record.update(detections=[{"score": 0.6}, {"score": 0.55}], best_score=0.6)
  assert prediction.describe_record(record, 0.5) == "/img/a.jpg: 2 detections -> /out/a.png"
  assert [prediction.suggested_threshold(s) for s in (0.031, 0.9, 0.0)] == [0.03, 0.9, 0.0]
