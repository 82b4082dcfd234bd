"""The training run: ``train_and_evaluate(config, workdir)``, resumable at any checkpoint.

A run is a pure function of (config, step): the data iterator restarts at the checkpointed step
and dropout keys derive from (seed, step), so a run stopped and restarted with the same workdir
logs the same losses as one that never stopped.
"""

import dataclasses
import functools
import os
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from conddetr_jax import cli, data, models, progress, storage
from conddetr_jax import sharding as sharding_lib  # `sharding` names a Sharding below
from conddetr_jax.checkpoints import weights
from conddetr_jax.data import coco, inspect_batches
from conddetr_jax.evaluation import coco_eval
from conddetr_jax.training import batch as batch_lib  # `batch` names a data batch below
from conddetr_jax.training import (
  best_checkpoint,
  checkpoint,
  distributed,
  metrics,
  optimizer,
  parallel,
  telemetry,
)
from conddetr_jax.training import state as state_lib
from conddetr_jax.training import step as step_lib

PREDICTIONS_DIR = "predictions"
RNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")


@dataclasses.dataclass
class TrainResult:
  """What a call of ``train_and_evaluate`` ended with.

  Attributes:
    step: updates done (the step of the last checkpoint written).
    total_steps: the run's planned length.
    preempted: stopped early by SIGTERM (a checkpoint of ``step`` was written first).
    train_metrics: the last logged training scalars.
    eval_metrics: the last evaluation's metrics (empty if none ran in this call).
    prediction_images: the PNGs drawn at the end (``config.evaluation.prediction_images``).
    best: ``{"step", "metric", "value", "path"}`` of the weights ``config.keep_best`` kept (None if
      it keeps none, or before the first evaluation).
  """

  step: int
  total_steps: int
  preempted: bool
  train_metrics: dict[str, float]
  eval_metrics: dict[str, float]
  prediction_images: list[str] = dataclasses.field(default_factory=list)
  best: dict[str, Any] | None = None


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Fails fast, before any data is read or anything compiles, naming the offending field.

  Raises:
    ValueError: an unknown backbone or dtype, an unknown ``parallel`` mode or ``rng_impl``, a
      batch that does not split into ``grad_accum_steps`` micro-batches over the devices, or a
      non-positive run length or interval, or ``ema_decay`` outside [0, 1), or an unknown
      ``dataset.train_resize``.
  """
  models.build_model(config)  # checks config.model.*
  data.check_train_resize(config.dataset)
  if config.parallel not in parallel.PARALLEL_MODES:
    raise ValueError(
      f"config.parallel={config.parallel!r}: expected one of {parallel.PARALLEL_MODES}"
    )
  batch_lib.plan_batch(config, device_count)
  if config.rng_impl not in RNG_IMPLS:
    raise ValueError(f"config.rng_impl={config.rng_impl!r}: expected one of {RNG_IMPLS}")
  if config.total_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(
      f"config.num_epochs={config.num_epochs} and config.total_steps={config.total_steps}: "
      "one of them must be > 0"
    )
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(
      f"config.ema_decay={config.ema_decay}: must be in [0, 1) (0 = no weight average)"
    )
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[field] < 1:
      raise ValueError(f"config.{field}={config[field]}: must be >= 1")
  if config.tensorboard_train_images < 0:
    raise ValueError(
      f"config.tensorboard_train_images={config.tensorboard_train_images}: must be >= 0"
    )


class _PreemptionWatch:
  """Notices SIGTERM: a local signal flag on one host, JAX's agreed sync point on several.

  On several hosts every process must stop at the same step (checkpoint saves are collective),
  which ``jax.distributed``'s preemption service arranges; it installs its own SIGTERM listener.
  """

  def __init__(self, checkpointer: checkpoint.Checkpointer):
    self._checkpointer = checkpointer
    self._signalled = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())

  def reached(self, step: int) -> bool:
    """Whether to save and stop after ``step``; call once per step on every process."""
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return self._signalled.is_set()

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# torchvision's ImageNet weights (IMAGENET1K_V1, the ones the original starts from), by backbone.
IMAGENET_WEIGHTS_URL = {
  "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
  "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
  "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
  "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}


def check_initial_weights(config: ml_collections.ConfigDict) -> bool:
  """Checks ``config.init_from`` exists; warns, and returns True, when a frozen-BatchNorm backbone
  would start from random weights.

  Frozen BatchNorm keeps its initial statistics, so without ImageNet weights (``config.init_from``)
  the backbone normalises nothing and the run does not converge like the original.
  ``config.init.allow_random_backbone=True`` says it is meant.

  Raises:
    FileNotFoundError: ``config.init_from`` names nothing.
  """
  if config.init_from:
    storage.check_reachable(config.init_from, "config.init_from")
  if config.init_from and not storage.path(config.init_from).exists():
    raise FileNotFoundError(f"config.init_from={config.init_from!r}: no such file or folder")
  if (
    config.model.backbone_norm != "frozen_bn"
    or config.init_from
    or config.init.allow_random_backbone
  ):
    return False
  url = IMAGENET_WEIGHTS_URL[config.model.backbone]
  logging.warning(
    "\n%s\nconfig.model.backbone_norm='frozen_bn' but config.init_from is empty: the %s backbone "
    "starts from RANDOM weights with frozen BatchNorm, and this run will not converge like the "
    "original, which starts from ImageNet weights.\n  Download %s and add "
    "--config.init_from=/path/to/%s\n  or, if random weights are meant, "
    "--config.init.allow_random_backbone=True\n%s",
    "!" * 100,
    config.model.backbone,
    url,
    os.path.basename(url),
    "!" * 100,
  )
  return True


def _initial_state(
  config: ml_collections.ConfigDict,
  model: Any,
  create: Any,
  rng: jax.Array,
  sharding: Any,
) -> state_lib.TrainState:
  """A step-0 state laid out as ``sharding`` (one, or a state of them): fresh init, or
  ``config.init_from``'s weights."""
  logging.info("initialising the model (compiling its init function)...")
  variables = models.init_variables(model, rng)
  if config.init_from:
    logging.info("Initial weights from %s", config.init_from)
    variables = weights.load_initial_weights(config.init_from, config, jax.device_get(variables))
  return jax.jit(create, out_shardings=sharding)(variables)


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
  """Per-key means over the logging window (``lr`` is the last step's, the one just applied)."""
  host = jax.device_get(window)
  scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k not in ("finite", "lr")}
  scalars["lr"] = float(host[-1]["lr"])
  return scalars


def _eval_due(config: ml_collections.ConfigDict, step: int, steps_per_epoch: int) -> bool:
  """Periodic evaluation: every ``eval_every_steps``, every epoch if 0, never (but at the end) if <
  0."""
  if config.eval_every_steps > 0:
    return step % config.eval_every_steps == 0
  return config.eval_every_steps == 0 and step % steps_per_epoch == 0


def _drawn_first(
  batches: Iterator[dict[str, np.ndarray]],
  writer: metrics.MetricWriter,
  step: int,
  names: dict[int, str],
  count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """``batches`` unchanged, once the first ``count`` images of the first are in TensorBoard as the
  model is fed them (augmented, padded, with their boxes and class names), at ``step``."""
  first = next(batches)
  shown = {key: value[:count] for key, value in first.items()}
  writer.write_image(step, "train/batch", inspect_batches.render_batch(shown, names))
  yield first
  yield from batches


def build_train_step(
  config: ml_collections.ConfigDict, steps_per_epoch: int, mesh: jax.sharding.Mesh
) -> tuple[Any, Any, Callable[[Any], state_lib.TrainState], Any]:
  """The run's model, optimiser and parallel train step, as ``train_and_evaluate`` runs them.

  Shared with ``conddetr_jax.aot``, which compiles this very step for TPU slices.

  Returns:
    (model, abstract_variables, create, par): the detector; its ``{'params', 'batch_stats'}`` as
    ``jax.ShapeDtypeStruct`` leaves; ``create(variables) -> TrainState`` at step 0; and
    ``config.parallel``'s strategy holding the step on ``mesh``.
  """
  model = models.build_model(config)
  abstract_variables = models.init_variables(model, jax.random.PRNGKey(config.seed), abstract=True)
  schedule = optimizer.learning_rate_schedule(config, steps_per_epoch)
  tx = optimizer.build_optimizer(config, abstract_variables["params"], schedule)
  create = functools.partial(
    state_lib.create_train_state,
    tx=tx,
    rng=state_lib.dropout_key_data(config),
    keep_ema=config.ema_decay > 0,
  )
  step_fn = functools.partial(step_lib.train_step, model=model, tx=tx, config=config)
  state_sharding = parallel.train_state_sharding(
    jax.eval_shape(create, abstract_variables), mesh, parallel.splits_state(config)
  )
  par = parallel.make_parallel(config.parallel, step_fn, mesh, state_sharding)
  return model, abstract_variables, create, par


def _profile_dir(workdir: str) -> str:
  """Where ``config.profile_steps`` traces go: the run's TensorBoard folder, or for a workdir in a
  bucket a local folder (JAX's profiler writes local files)."""
  if storage.is_remote(workdir):
    return os.path.join(tempfile.gettempdir(), "conddetr_jax_profile")
  return os.path.join(workdir, metrics.TENSORBOARD_DIR)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains ``config``'s model, checkpointing to and resuming from ``<workdir>/checkpoints``.

  Writes ``<workdir>/metrics.jsonl`` and TensorBoard events (process 0), evaluates on the val
  split periodically and at the end, and on SIGTERM saves a checkpoint and returns early.

  Args:
    config: the run config (configs/default.py).
    workdir: the run's directory; restarting with the same one resumes the run.

  Returns:
    How the run ended (``TrainResult``).

  Raises:
    ValueError: a config error (before anything compiles).
    FileNotFoundError: ``config.dataset`` names no dataset (before anything compiles).
    FloatingPointError: a non-finite loss or gradient, unless ``config.skip_nonfinite``; the
      message names the step, and the last checkpoint written before it is left intact.
  """
  storage.check_reachable(workdir, "--workdir")
  validate_config(config, jax.device_count())
  plan = batch_lib.plan_batch(config, jax.device_count())
  config = batch_lib.resolved(config, plan)  # the step reads the derived grad_accum_steps
  batch_size = plan.global_batch
  data.prepare_dataset(config)
  data.check_num_classes(config)
  if config.keep_best:
    best_checkpoint.check_metric(config.keep_best, coco.load_split(config, "val").categories)
  steps_per_epoch = data.train_steps_per_epoch(config, batch_size)
  total_steps = (
    config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  )
  logging.info(
    "%s (%d processes); %d updates per epoch, %d updates",
    plan.describe(),
    jax.process_count(),
    steps_per_epoch,
    total_steps,
  )
  departure = batch_lib.departure_from_recipe(config, plan)
  if departure:
    logging.info("%s", departure)

  check_initial_weights(config)
  init_rng = jax.random.PRNGKey(config.seed)
  mesh = sharding_lib.make_mesh()
  model, abstract_variables, create, par = build_train_step(config, steps_per_epoch, mesh)

  checkpointer = checkpoint.Checkpointer(
    storage.path(workdir) / weights.CHECKPOINT_DIR, config.keep_checkpoints
  )
  latest = checkpointer.latest_step()
  if latest is None:
    host_state = _initial_state(config, model, create, init_rng, par.state_sharding)
  else:
    target = par.abstract_state(jax.eval_shape(create, abstract_variables))
    host_state, meta = checkpointer.restore(latest, target)
    if meta.get("global_batch_size") != batch_size:
      logging.warning(
        "checkpoint %d was written with global batch %s, this run uses %d: the data order "
        "differs from an uninterrupted run",
        latest,
        meta.get("global_batch_size"),
        batch_size,
      )
    logging.info("Resumed from %s at step %d", checkpointer.directory, latest)
  start_step = int(jax.device_get(host_state.step))
  state = par.device_state(host_state)
  del host_state

  writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
  speed = telemetry.Telemetry(
    jax.devices()[0].device_kind, jax.device_count(), batch_size, config.grad_accum_steps
  )
  profiler = telemetry.StepProfiler(
    _profile_dir(workdir),
    config.profile_steps,
    start_step + 1,
    enabled=config.profile_all_processes or jax.process_index() == 0,
  )
  preemption = _PreemptionWatch(checkpointer)
  best = best_checkpoint.BestCheckpoint(workdir, config.keep_best) if config.keep_best else None
  last_saved = latest

  def host_scalar(x: jax.Array) -> int:
    return int(jax.device_get(par.local(x)))

  def check_finite() -> None:
    first = host_scalar(state.first_nonfinite_step)
    if first > 0 and not config.skip_nonfinite:
      checkpointer.wait()
      raise FloatingPointError(
        f"Non-finite loss or gradient at step {first}. Stopping; the last checkpoint "
        f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is intact. "
        "Set config.skip_nonfinite=True to skip such updates instead."
      )

  def save(step: int) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    check_finite()
    checkpointer.save(step, par.host_state(state), {"step": step, "global_batch_size": batch_size})
    last_saved = step
    writer.flush()  # a workdir in a bucket: the records a resume will not log again are uploaded

  def evaluate(step: int) -> dict[str, float]:
    start = time.perf_counter()
    variables = state_lib.evaluated_variables(par.host_state(state), config.evaluation.use_ema)
    results = coco_eval.evaluate(config, model, variables, mesh, step=step)
    seconds = time.perf_counter() - start
    speed.eval_s += seconds
    images_per_s = len(coco.load_split(config, "val")) / seconds
    writer.write(
      step,
      {
        "epoch": round(step / steps_per_epoch, 4),
        **results,
        "eval_s": seconds,
        "eval_images_per_s": images_per_s,
      },
    )
    writer.flush()  # not left to the next upload: an evaluation is rare and costly to redo
    if best is not None:
      best.offer(step, variables, results)
    of_average = (
      " of the weights' moving average"
      if config.ema_decay > 0 and config.evaluation.use_ema
      else ""
    )
    logging.info(
      "eval at step %d%s: %s (all 12 in %s)",
      step,
      of_average,
      cli.format_metrics(results),
      metrics.METRICS_FILE,
    )
    return dict(results)

  train_scalars, eval_scalars = {}, {}
  preempted = False
  host_batches = data.train_iterator(config, global_batch_size=batch_size, start_step=start_step)
  if config.tensorboard_train_images > 0 and jax.process_index() == 0:
    host_batches = _drawn_first(
      host_batches,
      writer,
      start_step + 1,
      coco.category_names(config),
      config.tensorboard_train_images,
    )
  batches = data.prefetch_to_device(map(par.host_batch, host_batches), par.batch_sharding)
  # Every process compiles each batch shape's step, then waits for the others before its first run:
  # the steps' collectives must start together. One announcer per train(), so each name is new.
  train_step = progress.CompileAnnouncer(
    par.step,
    par.compile,
    synchronize=lambda name: distributed.wait_for_all_processes(f"conddetr_jax_compiled_{name}"),
  )
  prediction_paths = []
  window, window_start, input_wait = [], time.time(), 0.0
  try:
    for step in range(start_step + 1, total_steps + 1):
      waited_from = time.perf_counter()
      batch = next(batches)
      input_wait += time.perf_counter() - waited_from
      profiler.before_step(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_step(state, batch)
      profiler.after_step(step, state)
      window.append(par.local(step_metrics))
      is_last = step == total_steps
      preempted = preemption.reached(step)
      if step % config.log_every_steps == 0 or is_last or preempted:
        train_scalars = _mean_metrics(window)
        compile_s = train_step.take_compile_seconds()
        speed.compile_s += compile_s
        elapsed = time.time() - window_start - compile_s  # step time only
        train_scalars.update(
          epoch=round(step / steps_per_epoch, 4),
          skipped_updates=host_scalar(state.nonfinite_count),
          **speed.window(len(window), elapsed, input_wait, train_step.take_flops()),
        )
        writer.write(step, train_scalars)
        metrics.log_progress(
          step, total_steps, train_scalars, (total_steps - step) * elapsed / len(window)
        )
        window, window_start, input_wait = [], time.time(), 0.0
        check_finite()
      if step % config.checkpoint_every_steps == 0 or is_last or preempted:
        save(step)
      if preempted:
        logging.warning(
          "SIGTERM: saved step %d and stopping; rerun the same command to resume", step
        )
        break
      if _eval_due(config, step, steps_per_epoch) and not is_last:
        eval_scalars = evaluate(step)
        window_start, input_wait = time.time(), 0.0  # evaluation time is not training throughput
    else:
      save(total_steps)
      # Every process reads the record: the workdir is shared, as its checkpoints need it to be, so
      # all skip the (collective) evaluation together.
      recorded = (
        metrics.recorded_evaluation(workdir, total_steps) if start_step == total_steps else None
      )
      if recorded is None:
        eval_scalars = evaluate(total_steps)
      else:
        eval_scalars = recorded
        logging.info(
          "the run is finished and step %d was evaluated already: %s (%s; eval.py evaluates it "
          "again)",
          total_steps,
          cli.format_metrics(recorded),
          metrics.METRICS_FILE,
        )
      if config.evaluation.prediction_images > 0:
        logging.info("drawing the detections on %d val images", config.evaluation.prediction_images)
        variables = state_lib.evaluated_variables(par.host_state(state), config.evaluation.use_ema)
        prediction_paths = coco_eval.write_prediction_images(
          config,
          model,
          variables,
          storage.path(workdir) / PREDICTIONS_DIR,
          config.evaluation.prediction_images,
        )
  finally:
    profiler.close(state)
    preemption.close()
    if best is not None:
      best.close()
    checkpointer.close()
    writer.close()
  return TrainResult(
    step=last_saved or 0,
    total_steps=total_steps,
    preempted=preempted,
    train_metrics=train_scalars,
    eval_metrics=eval_scalars,
    prediction_images=prediction_paths,
    best=None
    if best is None or best.best is None
    else dict(best.best, path=storage.join(workdir, best_checkpoint.BEST_DIR)),
  )
