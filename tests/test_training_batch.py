"""The recipes' global batch (16, the original's) is kept on any device count, or the run stops
naming the numbers to set; a run whose batch is not 16 says so."""

import pytest

from configs import r50, r50_dc5, r101, r101_dc5, test_tiny
from conddetr_jax.training import batch as batch_lib

RECIPES = (r50, r50_dc5, r101, r101_dc5)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda m: m.__name__.split(".")[-1])
@pytest.mark.parametrize("devices, per_device, accum", [(1, 2, 8), (2, 2, 4), (8, 2, 1), (16, 1, 1)])
def test_a_recipe_keeps_the_global_batch_of_16_on_any_device_count(recipe, devices, per_device, accum):
  plan = batch_lib.plan_batch(recipe.get_config(), devices)
  assert plan == batch_lib.BatchPlan(global_batch=16, per_device=per_device, devices=devices, accum_steps=accum)
  assert plan.describe() == f"global batch 16 = {per_device} per device x {devices} devices x {accum} accumulation steps"
  assert batch_lib.departure_from_recipe(recipe.get_config(), plan) is None


def test_the_resolved_config_carries_the_derived_accumulation_to_the_step():
  config = r50.get_config()
  resolved = batch_lib.resolved(config, batch_lib.plan_batch(config, 2))
  assert (resolved.per_device_batch_size, resolved.grad_accum_steps) == (2, 4)
  assert config.grad_accum_steps == 0  # the caller's config is left as it was


def test_a_smaller_per_device_micro_batch_accumulates_more():
  config = r50.get_config()
  config.per_device_batch_size = 1
  assert batch_lib.plan_batch(config, 2) == batch_lib.BatchPlan(16, 1, 2, 8)
  config.per_device_batch_size = 3  # 8 images per device: micro-batches of 2, the largest that split it
  assert batch_lib.plan_batch(config, 2) == batch_lib.BatchPlan(16, 2, 2, 4)


@pytest.mark.parametrize("devices, message", [
    (3, r"^config.global_batch_size=16 does not split over 3 devices: run on a device count that divides 16, "
        r"or change the global batch with --config.global_batch_size=15 or 18 \(the learning rates stay as configured\)$"),
    (32, r"^config.global_batch_size=16 does not split over 32 devices: .* --config.global_batch_size=32 \("),
])
def test_a_global_batch_that_does_not_split_over_the_devices_stops_with_the_numbers_to_set(devices, message):
  with pytest.raises(ValueError, match=message):
    batch_lib.plan_batch(r50.get_config(), devices)


def test_a_batch_that_is_not_the_recipe_s_says_so_in_one_line():
  config = r50.get_config()
  config.global_batch_size = 32
  line = batch_lib.departure_from_recipe(config, batch_lib.plan_batch(config, 8))
  assert line == ("global batch 32 (config.global_batch_size), not the original recipe's 16: learning rates and "
                  "schedule are used as configured, not scaled")
  tiny = test_tiny.get_config()  # no global batch: it grows with the devices
  plan = batch_lib.plan_batch(tiny, 8)
  assert plan == batch_lib.BatchPlan(16, 2, 8, 1)
  assert batch_lib.departure_from_recipe(tiny, plan) is None
  line = batch_lib.departure_from_recipe(tiny, batch_lib.plan_batch(tiny, 2))
  assert line.startswith("global batch 4 (config.global_batch_size=0: per_device_batch_size x devices x "
                         "grad_accum_steps), not the original recipe's 16") and "\n" not in line
