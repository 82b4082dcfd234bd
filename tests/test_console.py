"""The user's console: one-line errors naming the field or path, quiet logs, progress and summaries.

Most checks run the shared helpers of conddetr_jax/cli.py and progress.py in-process; a few
subprocesses check that every entry point (train.py, eval.py, predict.py, convert) goes through
them.
"""

import logging as std_logging
import os
import subprocess

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from conddetr_jax import cli, data, progress
from conddetr_jax.data import find_images
from conddetr_jax.inference import prediction
from conddetr_jax.training import loop
from configs import test_tiny
from tests import processes

TINY = "--config=configs/test_tiny.py"


def parse_error(*args: str) -> str:
  """The ``error:`` line that ``cli.parse_flags`` exits with for this command line."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv
  )  # (it reads sys.argv otherwise)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=flag_values)
  flags.mark_flag_as_required("workdir", flag_values=flag_values)
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv, flag_values=flag_values)
  return str(exit_info.value.code)


# ------------------------------------------------------------------------------- flag mistakes


def test_an_unknown_field_is_named_with_the_closest_one():
  assert parse_error(TINY, "--workdir=w", "--config.per_device_batch_sise=8") == (
    "error: --config.per_device_batch_sise: config has no field 'per_device_batch_sise'; "
    "did you mean per_device_batch_size?"
  )
  assert parse_error(TINY, "--workdir=w", "--config.model.num_queris=5") == (
    "error: --config.model.num_queris: config.model has no field 'num_queris'; did you mean "
    "num_queries?"
  )


def test_an_unknown_field_without_a_close_name_lists_the_group():
  message = parse_error(TINY, "--workdir=w", "--config.loss.zzz=1")
  assert message.startswith(
    "error: --config.loss.zzz: config.loss has no field 'zzz'; its fields are "
  )
  assert "bbox_weight" in message and "giou_weight" in message


def test_a_field_below_a_value_is_named():
  assert parse_error(TINY, "--workdir=w", "--config.seed.x=1") == (
    "error: --config.seed.x: config.seed is an integer, it has no field 'x'"
  )


def test_a_value_of_the_wrong_type_names_the_field_and_the_expected_type():
  message = parse_error(TINY, "--workdir=w", "--config.total_steps=1.5")
  assert message.startswith(
    "error: --config.total_steps=1.5: expected an integer like the default 8 ("
  )


def test_types_are_named_with_their_article():
  assert [
    cli.type_phrase(v) for v in (8, 0.1, "r50", True, (1, 2), [], ml_collections.ConfigDict())
  ] == ["an integer", "a number", "a string", "a boolean", "a tuple", "a list", "a ConfigDict"]


def test_a_missing_config_file_and_a_missing_flag_are_one_line():
  assert parse_error("--config=configs/nope.py", "--workdir=w") == (
    "error: --config=configs/nope.py: cannot load the config file: "
    "[Errno 2] No such file or directory: 'configs/nope.py'"
  )
  assert parse_error(TINY) == "error: --workdir is required (see --helpshort)"
  assert parse_error(TINY, "--workdir=w", "--nosuchflag=1") == (
    "error: Unknown command line flag 'nosuchflag' (see --helpshort)"
  )


def test_verbosity_brings_back_the_traceback():
  argv = ["prog", TINY, "--workdir=w", "--config.model.num_queris=5", "-v", "1"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=flag_values)
  flags.DEFINE_integer("verbosity", 0, "verbosity", short_name="v", flag_values=flag_values)
  with pytest.raises(AttributeError, match="num_queris"):
    cli.parse_flags(argv, flag_values=flag_values)


def test_verbosity_is_read_from_the_command_line_before_flags_parse():
  assert cli.verbosity(["train.py", TINY]) == 0
  assert cli.verbosity(["train.py", "-v", "1"]) == 1
  assert cli.verbosity(["train.py", "--verbosity=2"]) == 2
  assert cli.verbosity(["train.py", "-v=1"]) == 1


# ------------------------------------------------------------------------------------- log noise


def _record(pathname: str, level: int, message: str) -> std_logging.LogRecord:
  return std_logging.LogRecord("absl", level, pathname, 1, message, None, None)


def test_the_console_keeps_our_lines_and_other_libraries_warnings_but_not_their_chatter():
  keep = cli._ConsoleFilter().filter  # pylint: disable=protected-access
  ours = os.path.join(processes.REPO, "conddetr_jax", "training", "loop.py")
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert keep(_record(ours, std_logging.INFO, "step 1/10"))
  assert not keep(_record(orbax, std_logging.INFO, "Saving item to /tmp/x"))
  assert not keep(
    _record(
      "/site-packages/jax/_src/xla_bridge.py",
      std_logging.INFO,
      "Unable to initialize backend 'tpu'",
    )
  )
  assert not keep(_record(orbax, std_logging.WARNING, "Missing metrics for step 500"))
  assert keep(_record(orbax, std_logging.WARNING, "Something unexpected"))
  assert keep(_record(orbax, std_logging.ERROR, "Missing metrics for step 500"))


def test_the_summary_names_every_output_and_the_metrics(capsys):
  cli.print_summary(
    "Trained step 10/10",
    {"checkpoints": "/w/checkpoints", "predictions": None, "metrics": "/w/metrics.jsonl"},
    {"AP": 0.41234, "AP50": 0.6, "APs": 0.1},
  )
  assert capsys.readouterr().out.splitlines() == [
    "Trained step 10/10",
    "  COCO box AP 0.412  AP50 0.600",
    "  checkpoints: /w/checkpoints",
    "  metrics:     /w/metrics.jsonl",
  ]


# -------------------------------------------------------------------------------- progress lines


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def info_lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == std_logging.INFO]


def test_progress_logs_every_period_and_at_the_end(caplog):
  clock = FakeClock()
  with caplog.at_level(std_logging.INFO):
    report = progress.Progress("evaluating", 5, unit="batches", every_s=10, clock=clock)
    for done, now in ((1, 3), (2, 11), (3, 15), (4, 22), (5, 23)):
      clock.now = now
      report.update(done, latest=np.zeros(2))
  assert info_lines(caplog) == [
    "evaluating: 5 batches...",
    "evaluating: 2/5 batches (11 s)",
    "evaluating: 4/5 batches (22 s)",
    "evaluating: 5/5 batches (23 s)",
  ]


def test_each_new_batch_shape_is_compiled_once_announced_and_synchronized_before_its_first_run(
  caplog,
):
  clock = FakeClock()
  events = []

  def compile_step(state, batch):
    events.append(("compile", batch["image"].shape[1:3]))
    clock.now += 30.0  # compiling takes 30 s, a step 1 s

  def step(state, batch):
    events.append(("run", batch["image"].shape[1:3]))
    clock.now += 1.0
    return state + 1

  announced = progress.CompileAnnouncer(
    step, compile_step, clock=clock, synchronize=lambda name: events.append(("synchronize", name))
  )
  state = 0
  with caplog.at_level(std_logging.INFO):
    for hw in ((64, 96), (64, 96), (96, 64), (64, 96)):
      state = announced(state, {"image": np.zeros((2, *hw, 3))})
  assert state == 4
  assert events == [
    ("compile", (64, 96)),
    ("synchronize", "train_step_64x96"),
    ("run", (64, 96)),
    ("run", (64, 96)),
    ("compile", (96, 64)),
    ("synchronize", "train_step_96x64"),
    ("run", (96, 64)),
    ("run", (64, 96)),
  ]
  assert info_lines(caplog) == [
    "compiling the train step for 64x96 images (the first step of each batch shape)...",
    "compiled the train step for 64x96 in 30.0 s",
    "compiling the train step for 96x64 images (the first step of each batch shape)...",
    "compiled the train step for 96x64 in 30.0 s",
  ]
  assert announced.take_compile_seconds() == 60.0 and announced.take_compile_seconds() == 0.0


# ------------------------------------------------------------------------------ ImageNet weights


@pytest.mark.parametrize(
  "backbone,url",
  [
    ("resnet18", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    ("resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
  ],
)
def test_a_frozen_batchnorm_backbone_without_init_from_warns(caplog, backbone, url):
  config = test_tiny.get_config()
  config.model.backbone = backbone
  with caplog.at_level(std_logging.WARNING):
    assert loop.check_initial_weights(config)
  [warning] = [r.getMessage() for r in caplog.records if r.levelno == std_logging.WARNING]
  assert "RANDOM weights with frozen BatchNorm" in warning
  assert f"Download {url} and add --config.init_from=/path/to/{url.rsplit('/', 1)[1]}" in warning
  assert "--config.init.allow_random_backbone=True" in warning


def test_no_warning_when_random_weights_are_meant_or_the_backbone_trains_its_norm(tmp_path):
  config = test_tiny.get_config()
  config.init.allow_random_backbone = True
  assert not loop.check_initial_weights(config)
  config = test_tiny.get_config()
  config.model.backbone_norm = "group_norm"
  assert not loop.check_initial_weights(config)
  config = test_tiny.get_config()
  config.init_from = str(tmp_path)
  assert not loop.check_initial_weights(config)


def test_a_missing_init_from_is_named():
  config = test_tiny.get_config()
  config.init_from = "/nonexistent/resnet50.pth"
  with pytest.raises(
    FileNotFoundError, match=r"config.init_from='/nonexistent/resnet50.pth': no such file"
  ):
    loop.check_initial_weights(config)


# ----------------------------------------------------------------------- every entry point, end to
# end


def run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the commands must quiet TensorFlow themselves
  return processes.run_python(*args, env=env)


def assert_one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "oneDNN" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
  "command",
  [
    ["train.py", "--workdir=/tmp/unused"],
    ["predict.py", "--checkpoint=/tmp/unused", "--out=/tmp/unused", "image.jpg"],
    ["-m", "conddetr_jax.convert", "--torch=/tmp/unused.pth", "--out=/tmp/unused"],
  ],
)
def test_every_command_names_an_unknown_field(command):  # eval.py's: tests/test_cli.py
  proc = run(*command, TINY, "--config.model.num_queris=5")
  assert_one_error_line(
    proc,
    "--config.model.num_queris: config.model has no field 'num_queris'; did you mean num_queries?",
  )


@pytest.mark.slow
def test_train_names_a_wrong_dataset_root_once(tmp_path):
  proc = run(
    "train.py",
    TINY,
    f"--workdir={tmp_path}/w",
    "--config.dataset.source=coco",
    f"--config.dataset.root={tmp_path}/coco",
  )
  assert_one_error_line(
    proc,
    f"error: config.dataset (source='coco', root='{tmp_path}/coco') names no dataset: "
    f"Annotation file not found: {tmp_path}/coco/annotations/instances_train2017.json",
  )
  assert proc.stderr.count("Annotation file not found") == 1


def test_find_images_prints_the_first_val_files_without_knowing_the_cache_folder(tmp_path):
  config = test_tiny.get_config()
  config.dataset.synthetic_dir = str(tmp_path)
  assert find_images.image_paths(config, "val", 2) == [
    str(tmp_path / "val2017" / f"{i:012d}.jpg") for i in (1, 2)
  ]
  assert all(os.path.isfile(p) for p in find_images.image_paths(config, "train", 3))


@pytest.mark.slow
def test_the_documented_python_m_data_commands_run(tmp_path):
  # `python -m conddetr_jax.find_images` and `.inspect_batches` are in the README as commands.
  found = run(
    "-m",
    "conddetr_jax.find_images",
    TINY,
    f"--config.dataset.synthetic_dir={tmp_path}",
    "--count=2",
  )
  assert found.returncode == 0, found.stderr[-3000:]
  assert found.stdout.split() == [str(tmp_path / "val2017" / f"{i:012d}.jpg") for i in (1, 2)]
  out = tmp_path / "batch.png"
  drawn = run(
    "-m",
    "conddetr_jax.inspect_batches",
    TINY,
    f"--config.dataset.synthetic_dir={tmp_path}",
    f"--out={out}",
    "--batch_size=2",
  )
  assert drawn.returncode == 0 and out.is_file(), drawn.stderr[-3000:]
  assert "2 images padded to" in drawn.stdout
