"""How a run's global batch splits over the devices and gradient-accumulation steps.

The recipes fix the global batch (images per optimiser update; the original's is 16 = 2 per GPU x
8 GPUs, and 8 = 1 per GPU x 8 GPUs for DC5), because their learning rates were set for it. On any
other device count the run keeps it by accumulating gradients over micro-batches of at most
``per_device_batch_size`` images per device, or stops with the numbers to set. Nothing else
(learning rate, schedule) is ever rescaled.
"""

import dataclasses

import ml_collections

ORIGINAL_GLOBAL_BATCH = 16  # the original's: 2 images per GPU x 8 GPUs
ORIGINAL_DC5_GLOBAL_BATCH = 8  # its DC5 scripts': 1 image per GPU x 8 GPUs


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One optimiser update's images: ``global_batch = per_device x devices x accum_steps``.

  Attributes:
    global_batch: images per update.
    per_device: images per device in one micro-batch (what must fit in a device's memory).
    devices: devices the batch is split over.
    accum_steps: micro-batches whose gradients make one update.
  """

  global_batch: int
  per_device: int
  devices: int
  accum_steps: int

  def describe(self) -> str:
    """``global batch 16 = 2 per device x 1 devices x 8 accumulation steps``."""
    return (
      f"global batch {self.global_batch} = {self.per_device} per device x {self.devices} devices x "
      f"{self.accum_steps} accumulation steps"
    )


def _largest_divisor_at_most(n: int, cap: int) -> int:
  """The largest divisor of ``n`` that is <= ``cap`` (at least 1)."""
  return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


def plan_batch(config: ml_collections.ConfigDict, device_count: int) -> BatchPlan:
  """Splits the run's global batch over ``device_count`` devices.

  ``config.global_batch_size`` > 0 is kept whatever the device count: with ``grad_accum_steps`` = 0
  (derived) each device takes the largest micro-batch of at most ``per_device_batch_size`` images
  that splits its share evenly, and accumulates the rest; with ``grad_accum_steps`` = K > 0 each
  device takes ``global / (devices x K)``. ``global_batch_size`` = 0 makes the batch
  ``per_device_batch_size x devices x max(K, 1)``: it grows with the device count.

  Raises:
    ValueError: one line naming the fields and the values that would work, when the batch does not
      split over the devices (or the accumulation steps), or a field is out of range.
  """
  accum, per_device, total = (
    config.grad_accum_steps,
    config.per_device_batch_size,
    config.global_batch_size,
  )
  if accum < 0:
    raise ValueError(
      f"config.grad_accum_steps={accum}: must be >= 1, or 0 to derive it from the global batch"
    )
  if per_device < 1:
    raise ValueError(f"config.per_device_batch_size={per_device}: must be >= 1")
  if total <= 0:
    accum = max(accum, 1)
    return BatchPlan(per_device * device_count * accum, per_device, device_count, accum)
  if accum > 0:
    if total % (device_count * accum):
      raise ValueError(
        f"config.global_batch_size={total} is not divisible by the number of devices "
        f"({device_count}) x config.grad_accum_steps ({accum}): each device takes an equal "
        "share of every micro-batch; set --config.grad_accum_steps=0 to derive it"
      )
    return BatchPlan(total, total // (device_count * accum), device_count, accum)
  if total % device_count:
    lower, upper = total // device_count * device_count, -(-total // device_count) * device_count
    choices = " or ".join(str(n) for n in (lower, upper) if n > 0)
    raise ValueError(
      f"config.global_batch_size={total} does not split over {device_count} devices: run on a "
      f"device count that divides {total}, or change the global batch with "
      f"--config.global_batch_size={choices} (the learning rates stay as configured)"
    )
  share = total // device_count
  micro = _largest_divisor_at_most(share, per_device)
  return BatchPlan(total, micro, device_count, share // micro)


def resolved(config: ml_collections.ConfigDict, plan: BatchPlan) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose ``per_device_batch_size`` and ``grad_accum_steps`` are ``plan``'s,
  so that the train step (which reads ``grad_accum_steps``) runs what the plan says."""
  config = config.copy_and_resolve_references()
  config.per_device_batch_size = plan.per_device
  config.grad_accum_steps = plan.accum_steps
  return config


def original_global_batch(config: ml_collections.ConfigDict) -> int:
  """The global batch the original trains this model with: 8 for DC5 (``model.dilation``), else
  16."""
  return ORIGINAL_DC5_GLOBAL_BATCH if config.model.dilation else ORIGINAL_GLOBAL_BATCH


def departure_from_recipe(config: ml_collections.ConfigDict, plan: BatchPlan) -> str | None:
  """The one line a run prints when its global batch is not the original's for this model (16, or
  8 for DC5), else None."""
  original = original_global_batch(config)
  if plan.global_batch == original:
    return None
  source = (
    "config.global_batch_size"
    if config.global_batch_size > 0
    else "config.global_batch_size=0: per_device_batch_size x devices x grad_accum_steps"
  )
  recipe = "DC5 recipe" if config.model.dilation else "recipe"
  return (
    f"global batch {plan.global_batch} ({source}), not the original {recipe}'s {original}: "
    "learning rates and schedule are used as configured, not scaled"
  )
