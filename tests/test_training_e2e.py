"""train.py end to end on the synthetic dataset: outputs, exact resume after SIGTERM and SIGKILL,
non-finite losses, two processes, and config errors.

Every run uses the same tiny config and the test run's JAX compilation cache (tests/conftest.py), so
only the first run of each program compiles. Step losses are compared bit for bit: on CPU a run is
deterministic.
"""

import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conddetr_jax.checkpoints import weights
from conddetr_jax.training import checkpoint, loop, telemetry
from configs import test_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_PROCESS_CACHES = os.path.join(REPO, "tests", "every_process_caches.py")
TOTAL_STEPS = 10
# The runs' settings on top of configs/test_tiny.py: train.py's flags and the runs in this process.
RUN_SETTINGS = dict(
  global_batch_size=4,
  per_device_batch_size=4,
  total_steps=TOTAL_STEPS,
  checkpoint_every_steps=3,
  keep_checkpoints=10,
  log_every_steps=1,
)
# Poisons the images of one step, then runs train.py's main (argv as for train.py).
POISON = """
import sys
import numpy as np
from absl import app
from conddetr_jax import data
import train

step_to_poison = int(sys.argv.pop(1))
clean_iterator = data.train_iterator

def poisoned_iterator(config, *, global_batch_size, start_step=0, **kwargs):
  batches = clean_iterator(
      config, global_batch_size=global_batch_size, start_step=start_step, **kwargs)
  for step, batch in enumerate(batches, start_step + 1):
    if step == step_to_poison:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    yield batch

data.train_iterator = poisoned_iterator
app.run(train.main)
"""


class Runs:
  """Starts train.py runs of the tiny config that share a dataset and a compilation cache."""

  def __init__(self, root):
    self.root = root
    # No TF_CPP_MIN_LOG_LEVEL: train.py must quiet TensorFlow and XLA itself (checked on the
    # reference). The compilation cache and XLA_FLAGS (LLVM level 0) are the test run's
    # (tests/conftest.py), shared with every other module.
    self.env = dict(
      {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
      JAX_PLATFORMS="cpu",
      PYTHONPATH=REPO,
    )
    self.flags = [
      "--config=configs/test_tiny.py",
      f"--config.dataset.synthetic_dir={root / 'synthetic'}",
      *(f"--config.{name}={value}" for name, value in RUN_SETTINGS.items()),
    ]

  def start(
    self, workdir, *extra, poison_step=None, env=None, every_process_caches=False
  ) -> subprocess.Popen:
    """``every_process_caches``: for one process of a multi-process run
    (tests/every_process_caches.py)."""
    if poison_step:
      head = [sys.executable, "-c", POISON, str(poison_step)]
    elif every_process_caches:
      head = [sys.executable, EVERY_PROCESS_CACHES, "train.py"]
    else:
      head = [sys.executable, "train.py"]
    return subprocess.Popen(
      head + self.flags + [f"--workdir={workdir}", *extra],
      cwd=REPO,
      env=dict(self.env, **(env or {})),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )

  def run(self, workdir, *extra, poison_step=None) -> subprocess.CompletedProcess:
    proc = self.start(workdir, *extra, poison_step=poison_step)
    out, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def _records(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _train_records(workdir) -> list[dict]:
  return [r for r in _records(workdir) if "loss" in r]


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, after: int = 0) -> None:
  """Waits until metrics.jsonl has a training record of ``step`` or later among records
  ``after:``."""
  deadline = time.time() + 600
  while time.time() < deadline:
    if any(r["step"] >= step for r in _train_records(workdir)[after:]):
      return
    if proc.poll() is not None:
      raise AssertionError(
        f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()}"
      )
    time.sleep(0.05)
  raise AssertionError(f"no step {step} within 600 s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="module")
def reference(runs):
  """The uninterrupted run: its workdir, output and step -> loss. It profiles two steps (the
  losses do not change: the resumed runs below match them)."""
  workdir = runs.root / "reference"
  result = runs.run(workdir, "--config.profile_steps=2")
  assert result.returncode == 0, result.stdout
  losses = {r["step"]: r["loss"] for r in _train_records(workdir)}
  return workdir, result.stdout, losses


@pytest.mark.slow
def test_train_py_writes_metrics_tensorboard_checkpoints_and_evaluates_at_the_end(reference):
  workdir, output, losses = reference
  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
  keys = {
    "step",
    "epoch",
    "loss",
    "loss_ce",
    "loss_bbox",
    "loss_giou",
    "loss_ce_0",
    "lr",
    "grad_norm",
    "images_per_s",
  }
  assert all(keys <= set(r) for r in train)
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train)
  # Speed telemetry: a CPU counts FLOPs but has no bf16 peak, so no MFU (said once on the console).
  speed = {
    "images_per_s_per_device",
    "step_s",
    "step_s_without_input",
    "input_wait_share",
    "tflops_per_device",
    "compile_s",
    "eval_s",
  }
  assert all(speed <= set(r) and "mfu" not in r for r in train)
  assert all(r["tflops_per_device"] > 0 and 0 <= r["input_wait_share"] <= 1 for r in train)
  assert train[0]["compile_s"] > 0 and all(r["step_s_without_input"] <= r["step_s"] for r in train)
  assert (
    output.count("MFU is not reported") == 1
    and "TFLOP/s/device" in output
    and "input wait" in output
  )
  assert train[-1]["epoch"] == TOTAL_STEPS / 8  # 32 train images / global batch 4
  # lr_drop_epoch=1: the rate drops x0.1 after the first epoch's 8 updates.
  assert [r["lr"] for r in train] == pytest.approx([1e-4] * 8 + [1e-5] * 2)
  evals = [r for r in records if "AP" in r]
  assert len(evals) == 1 and evals[0]["step"] == TOTAL_STEPS and {"AP50", "AR100"} <= set(evals[0])
  assert evals[0]["eval_images_per_s"] > 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "3", "6", "9"]
  [events] = [
    workdir / "tensorboard" / n
    for n in os.listdir(workdir / "tensorboard")
    if n.startswith("events.out")
  ]
  tags = {v.tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
  assert {"loss", "tflops_per_device", "input_wait_share", "eval_images_per_s"} <= tags
  # config.tensorboard_train_images=4: the first batch's 4 images as fed, side by side (64x64 each).
  # The loader hands images as the image plugin's tensor: width, height, PNG.
  drawn = [
    v.tensor.string_val
    for e in EventFileLoader(str(events)).Load()
    for v in e.summary.value
    if v.tag == "train/batch" and v.metadata.plugin_data.plugin_name == "images"
  ]
  assert len(drawn) == 1 and Image.open(io.BytesIO(drawn[0][2])).size == (4 * 64, 64)
  # config.keep_best="AP": the evaluated weights of step 10 kept apart, named in the summary, read
  # back as eval.py reads them.
  assert os.listdir(workdir / "best") == ["10"]
  assert re.search(rf"best AP: +{re.escape(str(workdir))}/best \(step 10, ", output)
  config = test_tiny.get_config()
  best, step = weights.load_variables(config, str(workdir / "best"))
  final, _ = weights.load_variables(config, str(workdir))
  assert step == 10 and jax.tree.all(jax.tree.map(np.array_equal, best, final))
  # The profile of steps 2-3, where TensorBoard's profile tab looks for it.
  assert glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert "profiled steps 2-3" in output
  assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in output and "img/s" in output and "ETA" in output
  # The console: each compile announced, a closing summary naming the outputs, no library chatter.
  assert (
    output.count("compiling the train step for 64x64 images") == 1
    and "compiled the train step" in output
  )
  assert (
    f"Trained step {TOTAL_STEPS}/{TOTAL_STEPS}" in output
    and f"checkpoints: {workdir}/checkpoints" in output
  )
  assert (
    "Unable to initialize backend" not in output
    and "oneDNN" not in output
    and "orbax" not in output
  )
  assert not re.search(r"^[IWEF]\d{4} ", output, re.MULTILINE), (
    output
  )  # no C++ log lines (glog format)


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_one_evaluation_record_per_step(runs, reference, tmp_path):
  workdir = tmp_path / "finished"
  shutil.copytree(reference[0], workdir)
  before = _records(workdir)
  config = test_tiny.get_config()  # the reference's flags
  config.dataset.synthetic_dir = str(runs.root / "synthetic")
  config.update(RUN_SETTINGS)
  result = loop.train_and_evaluate(config, str(workdir))
  assert _records(workdir) == before  # nothing appended: no second AP record for the last step
  (recorded,) = [r for r in before if "AP" in r]
  assert result.eval_metrics == {k: v for k, v in recorded.items() if k not in ("step", "epoch")}


@pytest.mark.slow
def test_sigterm_then_sigkill_and_restarts_reproduce_the_uninterrupted_losses(
  runs, reference, tmp_path
):
  _, _, expected = reference
  workdir = tmp_path / "run"

  # SIGTERM (preemption): saves the current step, exits with 128 + 15.
  proc = runs.start(workdir)
  _wait_for_step(proc, workdir, 2)
  proc.send_signal(signal.SIGSTOP)  # freeze it so the signal lands mid-run, however fast it is
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 128 + signal.SIGTERM, out
  preempted_at = _train_records(workdir)[-1]["step"]
  assert 2 <= preempted_at < TOTAL_STEPS
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), 10).latest_step() == preempted_at

  # Restart; SIGKILL two steps later (no chance to save anything).
  seen = len(_train_records(workdir))
  proc = runs.start(workdir)
  _wait_for_step(proc, workdir, preempted_at + 2, after=seen)
  proc.kill()
  proc.communicate(timeout=60)
  assert _train_records(workdir)[seen]["step"] == preempted_at + 1  # resumed where it stopped

  # Restart again: resumes from the latest complete checkpoint and finishes.
  seen = len(_train_records(workdir))
  result = runs.run(workdir)
  assert result.returncode == 0, result.stdout
  resumed_from = _train_records(workdir)[seen]["step"] - 1
  assert resumed_from in (preempted_at, 3, 6, 9) and resumed_from >= preempted_at

  records = _train_records(workdir)
  assert {r["step"] for r in records} == set(range(1, TOTAL_STEPS + 1))
  for r in records:  # steps run twice (after the SIGKILL) give the same loss both times
    assert r["loss"] == expected[r["step"]], r["step"]
  evals = [r for r in _records(workdir) if "AP" in r]
  reference_eval = [r for r in _records(reference[0]) if "AP" in r]
  timeless = lambda records: [
    {k: v for k, v in r.items() if k not in telemetry.TIMING_KEYS} for r in records
  ]
  assert timeless(evals) == timeless(reference_eval)


def _restore_raw(directory, step):
  """A checkpoint's state as nested dicts of numpy arrays (no target structure needed)."""
  with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  runs, reference, tmp_path
):
  workdir = tmp_path / "stop"
  result = runs.run(workdir, poison_step=5)
  assert result.returncode != 0
  assert "Non-finite loss or gradient at step 5" in result.stdout
  assert [r["step"] for r in _train_records(workdir)][-1] == 5
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), 10).latest_step() == 3
  good, ref = (
    _restore_raw(workdir / "checkpoints", 3),
    _restore_raw(reference[0] / "checkpoints", 3),
  )
  jax.tree.map(np.testing.assert_array_equal, good["params"], ref["params"])


@pytest.mark.slow
def test_pmap_run_with_skip_nonfinite_skips_and_counts_the_bad_update(runs, reference, tmp_path):
  _, _, expected = reference
  workdir = tmp_path / "pmap_skip"
  result = runs.run(
    workdir,
    "--config.parallel=pmap",
    "--config.total_steps=4",
    "--config.skip_nonfinite=True",
    poison_step=2,
  )
  assert result.returncode == 0, result.stdout
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 4] and "AP" in records[-1]
  train = records[:4]
  assert [r["skipped_updates"] for r in train] == [0, 1, 1, 1]
  assert [np.isfinite(r["loss"]) for r in train] == [True, False, True, True]
  # Same data and initial weights as the jit run, but pmap draws dropout masks per device (equality
  # with dropout off is test_training_parallel's): the first loss agrees only roughly.
  assert train[0]["loss"] == pytest.approx(expected[1], rel=0.03)
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), 10).latest_step() == 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(runs, reference, tmp_path):
  _, _, expected = reference
  workdir = tmp_path / "multihost"
  address = f"127.0.0.1:{_free_port()}"
  procs = [
    runs.start(
      workdir,
      f"--coordinator_address={address}",
      "--num_processes=2",
      f"--process_id={i}",
      "--config.total_steps=3",
      every_process_caches=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0] + outputs[1]
  records = _records(workdir)  # process 0 alone writes: one record per step, one evaluation
  assert [r["step"] for r in records] == [1, 2, 3, 3] and "AP" in records[-1]
  np.testing.assert_allclose(
    [r["loss"] for r in records[:3]], [expected[s] for s in (1, 2, 3)], rtol=1e-5
  )
  assert "step 3/3" in outputs[0] and "step 3/3" not in outputs[1]
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), 10).latest_step() == 3


@pytest.mark.slow
def test_accumulation_counts_optimiser_updates_and_resumes_at_one(runs, reference, tmp_path):
  # The reference's global batch of 4, as 2 micro-batches of 2: the same 10 updates of the same
  # images, so the same epochs, learning rates (x0.1 after epoch 1 = 8 updates of 32 images) and
  # checkpoints; counting micro-batches would drop the rate after 16.
  workdir = tmp_path / "accum"
  result = runs.run(workdir, "--config.grad_accum_steps=2")
  assert result.returncode == 0, result.stdout
  records, expected = _train_records(workdir), _train_records(reference[0])
  assert [(r["step"], r["epoch"], r["lr"]) for r in records] == [
    (r["step"], r["epoch"], r["lr"]) for r in expected
  ]
  np.testing.assert_allclose([r["lr"] for r in records], [1e-4] * 8 + [1e-5] * 2, rtol=1e-6)
  assert [s for s in range(1, TOTAL_STEPS + 1) if (workdir / "checkpoints" / str(s)).is_dir()] == [
    3,
    6,
    9,
    10,
  ]

  # Resume from update 3 alone: it goes on at update 4 and logs the same losses.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints" / "3", resumed / "checkpoints" / "3")
  result = runs.run(resumed, "--config.grad_accum_steps=2")
  assert result.returncode == 0, result.stdout
  assert {r["step"]: r["loss"] for r in _train_records(resumed)} == {
    r["step"]: r["loss"] for r in records[3:]
  }


@pytest.mark.parametrize(
  "field, value, error, message",
  [
    ("model.backbone", "resnet7", ValueError, "config.model.backbone='resnet7'"),
    ("parallel", "pjit", ValueError, "config.parallel='pjit'"),
    ("per_device_batch_size", 0, ValueError, "config.per_device_batch_size=0"),
    (
      "dataset.train_resize",
      "bilinear",
      ValueError,
      "config.dataset.train_resize='bilinear': expected one of",
    ),
    (
      "dataset.root",
      "/nonexistent",
      FileNotFoundError,
      "config.dataset (source='coco', root='/nonexistent')",
    ),
  ],
)
def test_config_errors_fail_before_anything_compiles_naming_the_field(
  tmp_path, field, value, error, message
):
  config = test_tiny.get_config()
  config.dataset.source = "coco"
  config.dataset.root = str(tmp_path / "missing")
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(error) as info:
    loop.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert message in str(info.value)
  assert not os.path.exists(tmp_path / "workdir" / "checkpoints")


def test_global_batch_must_split_over_the_devices():
  config = test_tiny.get_config()
  config.global_batch_size = 12
  with pytest.raises(
    ValueError, match=r"config.global_batch_size=12 does not split over 8 devices"
  ):
    loop.validate_config(config, device_count=8)
  loop.validate_config(config, device_count=4)
