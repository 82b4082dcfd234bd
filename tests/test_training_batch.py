"""The recipes' global batch (the original's: 16, and 8 for DC5) is kept on any device count, or the
run stops naming the numbers to set; a run whose batch is not its recipe's says so. Accumulation
steps set explicitly are taken as set, and every plan is per device x devices x steps = the global
batch."""

import pytest

from conddetr_jax.training import batch as batch_lib
from configs import r50, r50_dc5, r101, r101_dc5, test_tiny

RECIPES = (r50, r101)
DC5_RECIPES = (r50_dc5, r101_dc5)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize(
  "devices, per_device, accum", [(1, 2, 8), (2, 2, 4), (8, 2, 1), (16, 1, 1)]
)
def test_a_recipe_keeps_the_global_batch_of_16_on_any_device_count(
  recipe, devices, per_device, accum
):
  plan = batch_lib.plan_batch(recipe.get_config(), devices)
  assert plan == batch_lib.BatchPlan(
    global_batch=16, per_device=per_device, devices=devices, accum_steps=accum
  )
  assert (
    plan.describe()
    == f"global batch 16 = {per_device} per device x {devices} devices x {accum} accumulation steps"
  )
  assert batch_lib.departure_from_recipe(recipe.get_config(), plan) is None


@pytest.mark.parametrize("recipe", DC5_RECIPES, ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize("devices, per_device, accum", [(1, 2, 4), (2, 2, 2), (4, 2, 1), (8, 1, 1)])
def test_a_dc5_recipe_keeps_the_original_s_global_batch_of_8_on_any_device_count(
  recipe, devices, per_device, accum
):
  config = recipe.get_config()
  plan = batch_lib.plan_batch(config, devices)
  assert plan == batch_lib.BatchPlan(
    global_batch=8, per_device=per_device, devices=devices, accum_steps=accum
  )
  assert plan.describe().startswith(f"global batch 8 = {per_device} per device x {devices} devices")
  assert batch_lib.departure_from_recipe(config, plan) is None


@pytest.mark.parametrize("recipe", DC5_RECIPES, ids=lambda m: m.__name__.split(".")[-1])
def test_a_dc5_recipe_trains_each_image_as_if_alone_with_the_r50_recipe_s_rates_and_schedule(
  recipe,
):
  """The original's DC5 scripts change only the batch (1 per GPU: no padding) and the backbone."""
  config, r50_config = recipe.get_config(), r50.get_config()
  assert config.model.mask_padding == "always"  # masked in training too
  assert config.model.dilation
  for field in ("num_epochs", "lr_drop_epoch", "total_steps"):
    assert config[field] == r50_config[field], field
  assert config.optimizer.to_dict() == r50_config.optimizer.to_dict()
  assert r50_config.model.mask_padding == "eval"  # R50 keeps the original's visible padding


def test_the_resolved_config_carries_the_derived_accumulation_to_the_step():
  config = r50.get_config()
  resolved = batch_lib.resolved(config, batch_lib.plan_batch(config, 2))
  assert (resolved.per_device_batch_size, resolved.grad_accum_steps) == (2, 4)
  assert config.grad_accum_steps == 0  # the caller's config is left as it was


def test_a_smaller_per_device_micro_batch_accumulates_more():
  config = r50.get_config()
  config.per_device_batch_size = 1
  assert batch_lib.plan_batch(config, 2) == batch_lib.BatchPlan(16, 1, 2, 8)
  config.per_device_batch_size = (
    3  # 8 images per device: micro-batches of 2, the largest that split it
  )
  assert batch_lib.plan_batch(config, 2) == batch_lib.BatchPlan(16, 2, 2, 4)


@pytest.mark.parametrize(
  "devices, message",
  [
    (
      3,
      r"^config.global_batch_size=16 does not split over 3 devices: run on a device count that "
      r"divides 16, or change the global batch with --config.global_batch_size=15 or 18 \(the "
      r"learning rates stay as configured\)$",
    ),
    (
      32,
      r"^config.global_batch_size=16 does not split over 32 devices: .* "
      r"--config.global_batch_size=32 \(",
    ),
  ],
)
def test_a_global_batch_that_does_not_split_over_the_devices_stops_with_the_numbers_to_set(
  devices, message
):
  with pytest.raises(ValueError, match=message):
    batch_lib.plan_batch(r50.get_config(), devices)


@pytest.mark.parametrize(
  "recipe, global_batch, expected",
  [
    (
      r50,
      32,
      "global batch 32 (config.global_batch_size), not the original recipe's 16: learning rates "
      "and schedule are used as configured, not scaled",
    ),
    (  # a DC5 run at the R50 batch departs from the DC5 recipe
      r50_dc5,
      16,
      "global batch 16 (config.global_batch_size), not the original DC5 recipe's 8: learning "
      "rates and schedule are used as configured, not scaled",
    ),
  ],
  ids=["r50", "r50_dc5"],
)
def test_a_batch_that_is_not_the_recipe_s_says_so_in_one_line(recipe, global_batch, expected):
  config = recipe.get_config()
  config.global_batch_size = global_batch
  assert batch_lib.departure_from_recipe(config, batch_lib.plan_batch(config, 8)) == expected


def test_a_batch_that_grows_with_the_devices_says_so_in_one_line_when_not_the_recipe_s():
  tiny = test_tiny.get_config()  # no global batch: it grows with the devices
  plan = batch_lib.plan_batch(tiny, 8)
  assert plan == batch_lib.BatchPlan(16, 2, 8, 1)
  assert batch_lib.departure_from_recipe(tiny, plan) is None
  line = batch_lib.departure_from_recipe(tiny, batch_lib.plan_batch(tiny, 2))
  assert (
    line.startswith(
      "global batch 4 (config.global_batch_size=0: per_device_batch_size x devices x "
      "grad_accum_steps), not the original recipe's 16"
    )
    and "\n" not in line
  )


@pytest.mark.parametrize(
  "global_batch, accum, devices, plan",
  [
    (16, 2, 1, batch_lib.BatchPlan(16, 8, 1, 2)),  # K as set: 8 per device, over the cap of 2
    (16, 2, 4, batch_lib.BatchPlan(16, 2, 4, 2)),
    (16, 4, 4, batch_lib.BatchPlan(16, 1, 4, 4)),
    (16, 1, 8, batch_lib.BatchPlan(16, 2, 8, 1)),
    (32, 2, 8, batch_lib.BatchPlan(32, 2, 8, 2)),
    (0, 3, 4, batch_lib.BatchPlan(24, 2, 4, 3)),  # no global batch: 2 per device x 4 x 3 steps
    (0, 0, 2, batch_lib.BatchPlan(4, 2, 2, 1)),  # ... and 0 steps count as 1
  ],
)
def test_explicit_accumulation_steps_are_taken_as_set(global_batch, accum, devices, plan):
  config = r50.get_config()
  config.update(global_batch_size=global_batch, grad_accum_steps=accum)
  assert batch_lib.plan_batch(config, devices) == plan


@pytest.mark.parametrize("global_batch", [0, 8, 16, 24, 48])
@pytest.mark.parametrize("accum", [0, 1, 2, 3, 4])
def test_per_device_times_devices_times_steps_is_the_global_batch(global_batch, accum):
  config = r50.get_config()
  config.update(global_batch_size=global_batch, grad_accum_steps=accum)
  for per_device in (1, 2, 3):
    config.per_device_batch_size = per_device
    for devices in range(1, 17):
      # A global batch must split evenly over the devices, and over their steps when those are set.
      splits = not global_batch or global_batch % (devices * max(accum, 1)) == 0
      if not splits:
        with pytest.raises(ValueError, match=f"config.global_batch_size={global_batch} "):
          batch_lib.plan_batch(config, devices)
        continue
      plan = batch_lib.plan_batch(config, devices)
      assert plan.per_device * plan.devices * plan.accum_steps == plan.global_batch
      assert plan.devices == devices
      assert plan.global_batch == (global_batch or per_device * devices * max(accum, 1))
      if accum:
        assert plan.accum_steps == accum
      else:  # derived: the largest micro-batch within the cap, so the fewest steps
        assert plan.per_device <= per_device
        share = plan.global_batch // devices
        assert all(share % m for m in range(plan.per_device + 1, per_device + 1))


@pytest.mark.parametrize(
  "overrides, devices, message",
  [
    (
      dict(grad_accum_steps=2),
      3,
      r"^config.global_batch_size=16 is not divisible by the number of devices \(3\) x "
      r"config.grad_accum_steps \(2\): each device takes an equal share of every micro-batch; "
      r"set --config.grad_accum_steps=0 to derive it$",
    ),
    (
      dict(grad_accum_steps=3),
      1,
      r"^config.global_batch_size=16 is not divisible by .* \(1\) x .* \(3\)",
    ),
    (
      dict(grad_accum_steps=-1),
      1,
      r"^config.grad_accum_steps=-1: must be >= 1, or 0 to derive it from the global batch$",
    ),
    (dict(per_device_batch_size=0), 1, r"^config.per_device_batch_size=0: must be >= 1$"),
    (
      dict(global_batch_size=0, per_device_batch_size=0),
      1,
      r"^config.per_device_batch_size=0: must be >= 1$",
    ),
  ],
)
def test_a_field_out_of_range_or_steps_that_do_not_split_the_batch_stops_in_one_line(
  overrides, devices, message
):
  config = r50.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    batch_lib.plan_batch(config, devices)
