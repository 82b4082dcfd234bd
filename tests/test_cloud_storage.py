"""gs:// for the workdir, checkpoints and dataset, against a GCS emulator on 127.0.0.1.

The emulator (gcp-storage-emulator in memory, with tests/gcs_emulator.py's fix) is started once for
the module and stopped after.
Clients are pointed at it the way each documents: ``STORAGE_EMULATOR_HOST`` (gcsfs, behind epath)
and ``TENSORSTORE_GCS_HTTP_URL`` (TensorStore, behind Orbax's arrays)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conddetr_jax import data, models, storage
from conddetr_jax.checkpoints import weights
from conddetr_jax.data import coco
from conddetr_jax.evaluation import checkpoint_eval
from conddetr_jax.inference import prediction
from conddetr_jax.training import checkpoint, loop, metrics, telemetry
from configs import test_tiny
from tests import processes, test_training_e2e
from tests.test_training_checkpoint import _target, make_state

BUCKET = "conddetr-test"
TOTAL_STEPS = 12
RUN_STEPS = 3  # the train_and_evaluate runs': stopped after step 2 (checkpoint 2), resumed to 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """``http://127.0.0.1:PORT`` of a fresh in-memory GCS emulator holding bucket ``BUCKET``; the
  environment points every client at it for the module's tests."""
  port = _free_port()
  # gcp-storage-emulator with the generation headers TensorStore needs (tests/gcs_emulator.py).
  proc = subprocess.Popen(
    [sys.executable, "-m", "tests.gcs_emulator", f"--port={port}", f"--bucket={BUCKET}"],
    cwd=processes.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()})") from None
        time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv("STORAGE_EMULATOR_HOST", url)
      mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
      yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def _tiny_config(synthetic_dir, root: str | None = None):
  """test_tiny with test_training_e2e's flags; ``root``: read that COCO-format copy instead."""
  config = test_tiny.get_config()
  config.dataset.synthetic_dir = str(synthetic_dir)
  config.update(
    dict(test_training_e2e.RUN_SETTINGS, total_steps=TOTAL_STEPS, checkpoint_every_steps=6)
  )
  if root:
    config.dataset.update(source="coco", root=root, synthetic_dir="")
  return config


@pytest.fixture(scope="module")
def dataset(emulator, tmp_path_factory):
  """(local synthetic dataset folder, its copy in the bucket)."""
  local = tmp_path_factory.mktemp("cloud") / "synthetic"
  data.prepare_dataset(_tiny_config(local))
  remote = f"gs://{BUCKET}/data"
  for folder, _, names in os.walk(local):
    for name in names:
      if name.endswith(".json") or name.endswith(".jpg"):
        with open(os.path.join(folder, name), "rb") as f:
          storage.write_bytes(
            storage.join(remote, os.path.relpath(os.path.join(folder, name), local)), f.read()
          )
  return local, remote


def _records(workdir: str) -> list[dict]:
  path = storage.path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_config(local, root: str):
  """The train_and_evaluate runs' config: ``RUN_STEPS`` steps on the COCO-format copy at
  ``root``."""
  config = _tiny_config(local, root)
  config.update(total_steps=RUN_STEPS, checkpoint_every_steps=3)
  return config


def _without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in telemetry.TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
  """A run in a local workdir, on the dataset on disk: (its TrainResult, its metrics records, the
  workdir)."""
  local, _ = dataset
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = loop.train_and_evaluate(_run_config(local, str(local)), workdir)
  return result, _records(workdir), workdir


@pytest.fixture(scope="module")
def stopped_and_resumed(dataset):
  """The same run with its workdir and dataset in the bucket, sent SIGTERM during step 2 and run
  again: (the workdir, the stopped run's result, its records, the resumed run's result)."""
  local, remote = dataset
  workdir = f"gs://{BUCKET}/resumed"
  log_progress = metrics.log_progress

  def sigterm_after_step_1(step, *args):
    log_progress(step, *args)
    if step == 1:  # the loop notices it after step 2, saves step 2 and returns
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(metrics, "log_progress", sigterm_after_step_1)
    stopped = loop.train_and_evaluate(_run_config(local, remote), workdir)
  stopped_records = _records(workdir)
  resumed = loop.train_and_evaluate(_run_config(local, remote), workdir)
  return workdir, stopped, stopped_records, resumed


def test_the_dataset_read_from_a_bucket_gives_the_batches_read_from_disk(dataset):
  local, remote = dataset
  split = coco.load_split(_tiny_config(local, remote), "train")
  assert split.image_dir == f"{remote}/train2017" and not split.missing.any()
  batches = [
    next(data.train_iterator(_tiny_config(local, root), global_batch_size=4, start_step=5))
    for root in (str(local), remote)
  ]
  assert batches[0].keys() == batches[1].keys()
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)


# A program that handled a path with epath before conddetr_jax did: epath has cached its choice of
# gs:// client by then. It writes through storage and reads back through epath itself (as Orbax
# does).
_EPATH_FIRST = """
import sys
from etils import epath
assert epath.Path(sys.argv[1]).exists()
from conddetr_jax import storage
storage.write_bytes(sys.argv[2], b"written by storage")
sys.stdout.write(epath.Path(sys.argv[2]).read_text())
"""


def test_gs_goes_to_the_emulator_in_a_process_where_epath_handled_a_path_before_storage(
  emulator, tmp_path
):
  url = f"gs://{BUCKET}/epath-first/object.txt"
  env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}  # as in a fresh user's shell
  done = processes.run_python_ok("-c", _EPATH_FIRST, str(tmp_path), url, env=env, timeout=120)
  assert done.stdout == "written by storage"
  assert storage.read_bytes(url) == b"written by storage"  # it is in the emulated bucket


def test_checkpoints_in_a_bucket_round_trip_and_resume_at_the_latest_complete_step(emulator):
  directory = f"gs://{BUCKET}/run/checkpoints"
  first = checkpoint.Checkpointer(directory, keep=2)
  for step in (3, 6):
    first.save(step, make_state(step, size=1000), {"step": step})
  first.close()
  again = checkpoint.Checkpointer(directory, keep=2)
  assert again.latest_step() == 6 and str(again.directory) == directory
  expected = make_state(6, size=1000)
  state, meta = again.restore(6, _target(expected))
  again.close()
  assert meta["step"] == 6
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_metrics_in_a_bucket_are_appended_across_runs_with_tensorboard_events(emulator):
  workdir = f"gs://{BUCKET}/metrics-run"
  for step in (1, 2):  # two runs of one workdir, as a resumed run appends
    writer = metrics.MetricWriter(workdir)
    writer.write(step, {"loss": 1.0 / step})
    writer.close()
  assert _records(workdir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  assert metrics.recorded_evaluation(workdir, 2) is None
  assert len(list((storage.path(workdir) / "tensorboard").iterdir())) == 2  # one event file per run


def test_metrics_in_a_bucket_are_uploaded_at_most_every_interval_and_on_flush(emulator):
  workdir = f"gs://{BUCKET}/throttled-run"
  writer = metrics.MetricWriter(workdir, upload_every_s=3600)
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.5})
  assert _records(workdir) == []  # within the interval: buffered
  writer.flush()  # as the loop does at each checkpoint
  assert _records(workdir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  writer.close()
  eager = metrics.MetricWriter(workdir, upload_every_s=0)
  eager.write(3, {"loss": 0.25})
  assert _records(workdir)[-1] == {
    "step": 3,
    "loss": 0.25,
  }  # the interval has passed: uploaded by write
  eager.close()


def test_a_missing_or_unreachable_bucket_is_a_one_line_error_naming_the_path_and_the_setting(
  dataset, monkeypatch
):
  local, remote = dataset
  with pytest.raises(OSError) as missing:
    loop.train_and_evaluate(_tiny_config(local, remote), "gs://no-such-bucket/run")
  assert str(missing.value) == (
    "--workdir='gs://no-such-bucket/run': bucket 'no-such-bucket' does not exist (using "
    f"STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']}, "
    f"TENSORSTORE_GCS_HTTP_URL={os.environ['TENSORSTORE_GCS_HTTP_URL']})"
  )
  closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", closed)
  start = time.time()
  with pytest.raises(
    OSError,
    match=r"^config.dataset.root='gs://conddetr-test/data': no answer from the storage "
    rf"service within 2 s \(using STORAGE_EMULATOR_HOST={closed}, ",
  ) as unreachable:
    storage.check_reachable(remote, "config.dataset.root", timeout_s=2)
  assert time.time() - start < 10 and "\n" not in str(unreachable.value)
  assert not os.path.exists(
    "gs:"
  )  # nothing was written under a local folder named after the scheme


def test_a_run_in_a_bucket_stopped_by_sigterm_resumes_with_the_losses_of_an_uninterrupted_run(
  uninterrupted, stopped_and_resumed
):
  expected_result, expected_records, _ = uninterrupted
  workdir, stopped, stopped_records, resumed = stopped_and_resumed
  # What the stop left in the bucket: checkpoint 2 and the records of steps 1 and 2, uploaded.
  assert stopped.preempted and stopped.step == 2 and not stopped.eval_metrics
  assert [r["step"] for r in stopped_records] == [1, 2]
  assert not resumed.preempted and resumed.step == RUN_STEPS
  assert sorted(storage.listdir(storage.join(workdir, "checkpoints"))) == ["2", "3"]
  # Losses, gradients, learning rates and the final evaluation, bit for bit (JSON keeps every bit
  # of a float); only the throughput differs.
  assert _without_timing(_records(workdir)) == _without_timing(expected_records)
  assert [r["step"] for r in expected_records] == [1, 2, 3, 3]  # three steps, then the evaluation
  assert resumed.eval_metrics == expected_result.eval_metrics
  assert (storage.path(workdir) / "tensorboard").exists()


def test_eval_of_a_checkpoint_in_a_bucket_writes_its_metrics_and_detections_to_the_bucket(
  dataset, stopped_and_resumed
):
  local, remote = dataset
  run, _, _, resumed = stopped_and_resumed
  workdir = f"gs://{BUCKET}/eval"
  result = checkpoint_eval.evaluate_checkpoint(_run_config(local, remote), run, workdir)
  assert result.metrics == resumed.eval_metrics  # the run's own final evaluation of its last step
  assert _records(workdir) == [
    {"step": RUN_STEPS, "checkpoint": run, "split": "val", **result.metrics}
  ]
  detections = json.loads((storage.path(workdir) / "detections.json").read_text())
  assert detections and {d["image_id"] for d in detections} <= set(range(1, 9))


def test_init_from_a_run_in_a_bucket_gives_the_weights_of_the_same_run_on_disk(
  dataset, uninterrupted, stopped_and_resumed
):
  local, remote = dataset
  config = _run_config(local, remote)
  # The bucket's run and the local one ended with the same weights, bit for bit.
  from_bucket = weights.load_initial_weights(stopped_and_resumed[0], config, None)
  from_disk = weights.load_initial_weights(uninterrupted[2], config, None)
  for got, want in zip(jax.tree.leaves(from_bucket), jax.tree.leaves(from_disk), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_predict_from_a_bucket_to_a_bucket_writes_what_local_paths_give(
  dataset, tmp_path, stopped_and_resumed
):
  local, remote = dataset
  config = _run_config(local, remote)
  variables, _ = weights.load_variables(config, stopped_and_resumed[0])
  model = models.build_model(config)
  name = sorted(os.listdir(local / "val2017"))[0]
  stem = os.path.splitext(name)[0]
  out = f"gs://{BUCKET}/predictions"
  remote_records = prediction.predict_files(
    config, model, variables, [f"{remote}/val2017/{name}"], out, 0.0
  )
  local_records = prediction.predict_files(
    config, model, variables, [str(local / "val2017" / name)], str(tmp_path), 0.0
  )
  assert json.loads((storage.path(out) / "detections.json").read_text()) == remote_records
  assert (
    remote_records[0]["file"] == f"{remote}/val2017/{name}"
    and remote_records[0]["png"] == f"{out}/{stem}.png"
  )
  assert (storage.path(out) / f"{stem}.png").read_bytes() == (tmp_path / f"{stem}.png").read_bytes()
  assert [{k: v for k, v in r.items() if k not in ("file", "png")} for r in remote_records] == (
    [{k: v for k, v in r.items() if k not in ("file", "png")} for r in local_records]
  )
  assert remote_records[0]["detections"]  # threshold 0: every kept detection is compared
