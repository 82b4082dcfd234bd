"""What every command-line entry point shares: quiet logs, one-line errors, a closing summary.

train.py, eval.py, predict.py and ``python -m conddetr_jax.convert`` are thin: they call
``quiet_native_logs()`` before TensorFlow or JAX load, define their flags, and hand their ``main``
to ``run``. A user's mistake then reads the same in all of them: one ``error: ...`` line on stderr
naming the config field, flag or path, exit status 1, no traceback. ``-v 1`` (absl's
``--verbosity``) brings back the tracebacks and every library's log lines.

This module does not import JAX: it must run before JAX loads.
"""

import contextlib
import difflib
import importlib
import logging as std_logging
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import app, flags, logging
from ml_collections import config_flags  # loads no JAX

from conddetr_jax import configs  # a list of names: loads no JAX

# Mistakes a user makes (a path, a value, a missing package), printed as one line; anything else
# is a bug and keeps its traceback. RuntimeError covers data.BadImageError (an unreadable image).
USER_ERRORS = (OSError, ValueError, ImportError, FloatingPointError, RuntimeError)

# Warnings libraries print on every ordinary run; they read like errors but are expected.
EXPECTED_WARNINGS = (
  "Metadata file does not exist",  # Orbax, restoring a checkpoint written without it
  "Missing metrics for step",  # Orbax CheckpointManager on a workdir it did not write
  "CheckpointManagerOptions.read_only=True",  # Orbax, reading a training workdir's checkpoints
  "Given directory is read only",  # (the same)
)
_VERBOSITY_FLAG = re.compile(r"^--?(v|verbosity)(=(?P<value>-?\d+))?$")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def verbosity(argv: Sequence[str]) -> int:
  """absl's ``-v``/``--verbosity`` as given in ``argv`` (0 if absent), readable before flags
  parse."""
  level = 0
  for i, arg in enumerate(argv):
    m = _VERBOSITY_FLAG.match(arg)
    if m and m["value"] is not None:
      level = int(m["value"])
    elif m and i + 1 < len(argv) and re.fullmatch(r"-?\d+", argv[i + 1]):
      level = int(argv[i + 1])
  return level


def quiet_native_logs(argv: Sequence[str] | None = None, *, load_tensorflow: bool = True) -> None:
  """Silences TensorFlow's and XLA's C++ INFO and WARNING lines and TF's oneDNN notices, unless
  ``-v 1`` or more is given.

  Must run before TensorFlow or JAX is imported (they read the variable once, when they load).
  A value the user exported is kept. ``load_tensorflow``: import TensorFlow now, with the
  process's stderr closed: its shared libraries print a oneDNN notice while they load, whatever
  the log level.
  """
  if verbosity(sys.argv if argv is None else argv) >= 1:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # TF's oneDNN ops print an ERROR-level line ("oneDNN supports DT_INT32 only on platforms with
  # AVX-512") for the integer resize of data/pil_resample.py on most CPUs. The input pipeline has
  # no matmul or conv for oneDNN to speed up, and integer results are exact either way.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if load_tensorflow:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
      importlib.import_module("tensorflow")
    finally:  # an import error is raised, and printed, once stderr is back
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)


def _expected_warning(record: std_logging.LogRecord) -> bool:
  return record.levelno == std_logging.WARNING and any(
    e in record.getMessage() for e in EXPECTED_WARNINGS
  )


class _ConsoleFilter(std_logging.Filter):
  """Passes this project's records, and other libraries' warnings unless they are expected ones."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = os.path.abspath(record.pathname)
    if path.startswith(_PACKAGE_DIR + os.sep) or path == os.path.abspath(sys.argv[0]):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return not _expected_warning(record)


class _ExpectedWarningFilter(std_logging.Filter):
  """Drops the ``EXPECTED_WARNINGS``."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not _expected_warning(record)


@contextlib.contextmanager
def expected_warnings_hidden() -> Iterator[None]:
  """Within the block, libraries' ``EXPECTED_WARNINGS`` (logged through absl, as Orbax logs) are
  dropped: for the Python API, whose console is the user's (the commands filter theirs in
  ``setup_console_logging``)."""
  absl_logger, hide = std_logging.getLogger("absl"), _ExpectedWarningFilter()
  absl_logger.addFilter(hide)
  try:
    yield
  finally:
    absl_logger.removeFilter(hide)


class _ConsoleFormatter(std_logging.Formatter):
  """``12:03:44 message``; warnings and errors say so: ``12:03:44 WARNING: message``."""

  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname}: "
    return f"{stamp} {level}{record.getMessage()}"


def setup_console_logging(level: int) -> None:
  """At verbosity ``level`` < 1: short log lines, and other libraries' INFO lines and expected
  warnings dropped; at 1 or more, absl's full lines from every library."""
  if level >= 1:
    return
  handler = logging.get_absl_handler()
  handler.setFormatter(_ConsoleFormatter())
  handler.addFilter(_ConsoleFilter())


# ------------------------------------------------------------------------------------------ errors


def _field_names(group: Any) -> list[str]:
  return sorted(group.keys()) if hasattr(group, "keys") else []


_TYPE_PHRASES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def type_phrase(value: Any) -> str:
  """``value``'s type with its article, as a sentence says it: "an integer", "a tuple", "an
  OrderedDict"."""
  kind = type(value)
  if kind in _TYPE_PHRASES:
    return _TYPE_PHRASES[kind]
  name = kind.__name__
  return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def describe_unknown_field(config: Any, path: str, flag_name: str = "config") -> str | None:
  """Why ``--{flag_name}.{path}`` names no field of ``config``, with the closest existing name.

  Returns:
    e.g. "--config.per_device_batch_sise: config has no field 'per_device_batch_sise'; did you mean
    per_device_batch_size?", or None if ``path`` is a field.
  """
  node, walked = config, flag_name
  for key in path.split("."):
    names = _field_names(node)
    if not names:
      return f"--{flag_name}.{path}: {walked} is {type_phrase(node)}, it has no field {key!r}"
    if key not in names:
      close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
      hint = f"did you mean {close[0]}?" if close else f"its fields are {', '.join(names)}"
      return f"--{flag_name}.{path}: {walked} has no field {key!r}; {hint}"
    node, walked = node[key], f"{walked}.{key}"
  return None


def _config_argument(argv: Sequence[str], flag_name: str) -> str | None:
  """The value of ``--{flag_name}=...`` (or ``--{flag_name} ...``) in ``argv``."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag_name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{flag_name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: Sequence[str], flag_name: str) -> list[tuple[str, str | None]]:
  """(field path, value) of every ``--{flag_name}.a.b=value`` in ``argv``."""
  out = []
  for arg in argv:
    m = re.match(rf"^--{re.escape(flag_name)}\.([\w.]+)(=(.*))?$", arg, re.S)
    if m:
      out.append((m[1], m[3]))
  return out


def describe_flag_error(
  error: Exception,
  argv: Sequence[str],
  config_flag: str = "config",
  flag_values: flags.FlagValues = flags.FLAGS,
) -> str:
  """One line saying which flag or config field is wrong in ``argv`` and how (or why the config
  file does not load).

  Args:
    error: what parsing ``argv`` raised (absl's flags.Error, or ml_collections' KeyError,
      AttributeError or IOError for an unknown field or an unreadable config file).
    argv: the command line.
    config_flag: the name of the ``config_flags.DEFINE_config_file`` flag.
    flag_values: where the flags are defined.
  """
  config = None
  if config_flag in flag_values and _config_argument(argv, config_flag):
    try:
      config = flag_values[config_flag].parser.parse(_config_argument(argv, config_flag))
      config.keys()  # a config file that failed to load raises here
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
      return (
        f"--{config_flag}={_config_argument(argv, config_flag)}: cannot load the config file: "
        f"{first}"
      )
  if config is not None:
    for path, value in _overrides(argv, config_flag):
      problem = describe_unknown_field(config, path, config_flag)
      if problem:
        return problem
      bad_value = re.match(
        rf"flag --{re.escape(config_flag)}\.{re.escape(path)}=.*?: (.*)", str(error), re.S
      )
      if bad_value:
        current = config
        for key in path.split("."):
          current = current[key]
        return (
          f"--{config_flag}.{path}={value}: expected {type_phrase(current)} like the default "
          f"{current!r} ({bad_value[1].strip()})"
        )
  message = str(error).strip()
  if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":  # a KeyError's repr
    message = message[1:-1].replace("\\n", " ").replace("\\'", "'")
  message = re.sub(
    r"^flag (--\S+?)=None: Flag --\S+ must have a value other than None\.?$",
    r"\1 is required",
    message,
  )
  return f"{message} (see --helpshort)"


def resolve_config_name(argv: Sequence[str], flag_name: str = "config") -> list[str]:
  """``argv`` with ``--{flag_name}=NAME`` (a name of ``conddetr_jax.configs.NAMES``, as the Python
  API takes) replaced by that config's file in the package; files and other values are kept."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{flag_name}="):
      index, value = i, arg.split("=", 1)[1]
    elif arg == f"--{flag_name}" and i + 1 < len(out):
      index, value = i + 1, out[i + 1]
    else:
      continue
    if value in configs.NAMES and not os.path.exists(value):
      name_file = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), f"{value}.py")
      out[index] = f"--{flag_name}={name_file}" if index == i else name_file
  return out


def define_checkpoint_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """Defines the two required flags of every command that loads a trained model (eval.py,
  predict.py, ``python -m conddetr_jax.export``): ``--config`` (a config file, or a config name
  through ``parse_flags``; locked) and ``--checkpoint``.

  Returns:
    Their holders (config, checkpoint).
  """
  config = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/r50.py.", lock_config=True
  )
  checkpoint = flags.DEFINE_string(
    "checkpoint", None, "Workdir, step folder, Orbax checkpoint or .pth file."
  )
  flags.mark_flags_as_required(["config", "checkpoint"])
  return config, checkpoint


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, its failures turned into one ``error:`` line (a traceback at ``-v 1``).

  Returns:
    The arguments left after the flags (``argv[0]`` first), as ``absl.app.run`` expects.

  Raises:
    SystemExit: with the ``error:`` line, if a flag is wrong.
  """
  argv = resolve_config_name(argv)
  try:
    remaining = flag_values(argv)
    if "config" in flag_values and flag_values["config"].value is not None:
      flag_values["config"].value.keys()  # a config file that failed to load raises when first read
    return remaining
  except (flags.Error, KeyError, AttributeError, OSError, TypeError, ValueError) as e:
    if verbosity(argv) >= 1:
      raise
    sys.exit(f"error: {describe_flag_error(e, argv, flag_values=flag_values)}")


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` with this project's console: quiet logs, user errors as one line.

  A ``USER_ERRORS`` exception raised by ``main`` prints ``error: <message>`` and exits with 1;
  ``-v 1`` shows its traceback instead.
  """

  def guarded(argv: list[str]) -> Any:
    level = flags.FLAGS.verbosity
    setup_console_logging(level)
    try:
      return main(argv)
    except USER_ERRORS as e:
      if level >= 1:
        raise
      sys.exit(f"error: {e}")

  app.run(guarded, flags_parser=parse_flags)


# ----------------------------------------------------------------------------------------- summary


def format_metrics(
  metrics: Mapping[str, float], names: Sequence[str] = ("AP", "AP50", "AP75")
) -> str:
  """``AP 0.412  AP50 0.622  AP75 0.437`` from a metrics dict (missing names are left out)."""
  return "  ".join(f"{name} {metrics[name]:.3f}" for name in names if name in metrics)


def print_summary(
  title: str, outputs: Mapping[str, str | None], metrics: Mapping[str, float] | None = None
) -> None:
  """The closing lines of a command: what it did, where its outputs are, its final metrics.

  Args:
    title: e.g. "Trained 1000/1000 steps".
    outputs: description -> path ("checkpoints" -> "/tmp/run/checkpoints"); None entries are
      skipped.
    metrics: COCO metrics to show (``format_metrics``), if any.
  """
  lines = [title]
  if metrics:
    lines.append(f"  COCO box {format_metrics(metrics)}")
  width = max((len(k) for k, v in outputs.items() if v), default=0)
  lines += [f"  {name + ':':<{width + 1}} {path}" for name, path in outputs.items() if path]
  print("\n".join(lines), flush=True)
