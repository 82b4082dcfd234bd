"""The aot tool's per-stage cost table, the step's bytes and roofline in its summary line, and the
compiled step's loops: on the CPU backend, whose cost analysis counts FLOPs and bytes as the TPU
compiler's does (the TPU compile of the same program: tests/test_aot.py)."""

import jax
import pytest

from conddetr_jax.aot import compiling, hlo, report, roofline, stages
from conddetr_jax.hardware import chips

V5E = chips.TPUS["TPU v5 lite"]
BATCH, HW = 2, (32, 32)
STAGE_ROWS = (
  "backbone",
  "input projection",
  "encoder",
  "decoder",
  "heads",
  "criterion (matching + losses)",
  "matching (in criterion)",
  "optimizer update",
  "rest (step - stages)",
  "whole step",
)


@pytest.fixture(scope="module")
def tiny_report():
  """report.run on the tiny config for this process's CPU devices held as v5e chips: the printed
  lines, the summary line and the cost analysis of the train step it compiled."""
  from configs import test_tiny  # pylint: disable=g-import-not-at-top

  config = test_tiny.get_config()
  config.per_device_batch_size = BATCH
  compiled = []
  train = compiling.SliceCompiler.train
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(report.devices_lib, "devices_of", lambda topology: jax.devices())
    mp.setattr(report.devices_lib, "chip_of", lambda device: V5E)
    mp.setattr(
      compiling.SliceCompiler,
      "train",
      lambda self, *a: compiled.append(train(self, *a)) or compiled[-1],
    )
    lines: list[str] = []
    summary = report.run(config, "cpu", [HW], with_eval=False, out=lines.append)
  (step,) = compiled
  return lines, summary, stages.cost_of(step.executable)


def _row(lines: list[str], name: str) -> list[str]:
  (line,) = [line for line in "\n".join(lines).splitlines() if line.strip().startswith(name + "  ")]
  return line.strip()[len(name) :].split()


def test_the_table_has_a_row_per_stage_and_the_stages_flops_add_up_to_the_steps(tiny_report):
  lines, _, step = tiny_report
  text = "\n".join(lines)
  assert "per-stage cost of one train step" in text
  rows = {name: [float(v) for v in _row(lines, name)[:4]] for name in STAGE_ROWS}
  gflop, gb = rows["whole step"][0], rows["whole step"][1]
  assert gflop == pytest.approx(step.flops / 1e9, abs=0.051)
  assert gb == pytest.approx(step.bytes_accessed / 1e9, abs=0.0051)
  parts = [n for n in STAGE_ROWS if n not in ("matching (in criterion)", "whole step")]
  # Compiled alone, the stages do the step's arithmetic (the rest is glue): within 20% of it.
  summed = sum(rows[n][0] for n in parts if n != "rest (step - stages)")
  assert 0.8 * gflop <= summed <= 1.2 * gflop
  # The backbone does most of the FLOPs; the stages and the rest add up to the step's bytes.
  assert rows["backbone"][0] > 0.5 * gflop
  assert sum(rows[n][1] for n in parts) == pytest.approx(gb, abs=0.01)
  # Each row's roofline is the larger of its compute and traffic times on a v5e.
  for name in ("backbone", "optimizer update", "whole step"):
    f, b, _, ms = rows[name]
    assert ms == pytest.approx(1e3 * max(f * 1e9 / 197e12, b * 1e9 / 819e9), rel=0.05, abs=0.006)


def test_the_summary_line_has_the_steps_bytes_and_roofline_per_image(tiny_report):
  _, summary, step = tiny_report
  fields = dict(kv.split("=", 1) for kv in summary.split()[1:])
  assert float(fields["train_gb_per_image"]) == pytest.approx(
    step.bytes_accessed / BATCH / 1e9, abs=0.006
  )
  roofline_s = max(step.flops / 197e12, step.bytes_accessed / 819e9)
  assert float(fields["roofline_images_per_s_per_chip"]) == pytest.approx(
    BATCH / roofline_s, rel=0.01
  )


def test_the_matchers_loops_are_named_as_counted_once(tiny_report):
  lines, _, _ = tiny_report
  (line,) = [line for line in lines if "loops in the compiled step" in line]
  assert "cost_analysis counts each body once" in line and "matching.py:" in line


def test_while_loops_are_found_with_their_source_and_trip_count():
  def f(x):
    x = jax.lax.fori_loop(0, 10, lambda i, s: s * 2, x)
    return jax.lax.while_loop(lambda s: s.sum() < 1e9, lambda s: s * 3, x)

  text = jax.jit(f).lower(jax.numpy.ones((8, 8))).compile().as_text()
  loops = hlo.while_loops(text)
  assert sorted(loop["trip_count"] or 0 for loop in loops) == [0, 10]
  assert all(loop["source"].startswith("test_aot_roofline.py:") for loop in loops)


def test_a_target_without_cost_analysis_gets_no_roofline():
  assert roofline.images_per_s_per_chip(stages.StageCost(0.0, 0.0), V5E, 2) is None
  assert roofline.images_per_s_per_chip(stages.StageCost(1e12, 1e9), None, 2) is None
  assert roofline.images_per_s_per_chip(stages.StageCost(1e12, 1e9), V5E, 2) == pytest.approx(
    2 / max(1e12 / 197e12, 1e9 / 819e9)
  )


@pytest.mark.parametrize("rng_impl", ["rbg", "threefry2x32"])
def test_the_stages_draw_dropout_from_the_step_s_kind_of_key(rng_impl):
  """RBG's bits cost other bytes and FLOPs than threefry's: a stage must draw its dropout as the
  step does (``config.rng_impl``), or the table attributes the step's random bits wrongly."""
  from configs import test_tiny  # pylint: disable=g-import-not-at-top

  config = test_tiny.get_config()
  config.rng_impl = rng_impl
  compiler = compiling.SliceCompiler(config, jax.devices()[:1])
  state, batch = compiler.train_args(BATCH, HW)
  programs = stages.stage_programs(config, compiler.model, compiler.variables, batch, state)
  fn, args = programs["encoder"]
  text = jax.jit(fn).lower(*args).as_text()
  assert ("rng_bit_generator" in text) == (rng_impl == "rbg")
