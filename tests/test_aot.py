"""The ahead-of-time TPU compile tool (conddetr_jax.aot) and the papers' multiply-add counter."""

import importlib.util
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from conddetr_jax.aot import compiling, hlo, report
from conddetr_jax.aot import devices as aot_devices
from conddetr_jax.hardware import flops
from tests import processes

# Shapes and op spellings as XLA's TPU compiler prints them: a synchronous all-reduce of a tuple,
# an asynchronous all-gather pair, a collective inside a loop body, one all-gather of the TPU
# compiler's asynchronous collective fusions (chain 7: a copy of it in the start's, the done's and
# a continuation's computation), an all-reduce-scatter fusion (an all-reduce of which each device
# keeps a slice; the entry's all-reduce after it stays one), and look-alikes that are not
# collectives (a fusion whose name mentions all-reduce, a metadata string).
_HLO = """\
HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%fused_computation.1 (param_0.1: bf16[2,64]) -> bf16[8,64] {
  %param_0.1 = bf16[2,64]{1,0} parameter(0)
  ROOT %all-gather.10 = bf16[8,64]{1,0} all-gather(%param_0.1), channel_id=9, dimensions={0}, \
frontend_attributes={chain_id="7"}
}

%async_collective_fusion.2 (param_0.2: bf16[2,64]) -> bf16[8,64] {
  %param_0.2 = bf16[2,64]{1,0} parameter(0)
  ROOT %all-gather.11 = bf16[8,64]{1,0} all-gather(%param_0.2), channel_id=9, dimensions={0}, \
frontend_attributes={chain_id="7"}
}

%fused_computation.3 (param_0.3: bf16[2,64]) -> bf16[8,64] {
  %param_0.3 = bf16[2,64]{1,0} parameter(0)
  ROOT %all-gather.12 = bf16[8,64]{1,0} all-gather(%param_0.3), channel_id=9, dimensions={0}, \
frontend_attributes={chain_id="7"}
}

%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %x = f32[16]{0} get-tuple-element(%p), index=1
  %cp = f32[16]{0:T(128)} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %cp)
}

%all-reduce-scatter.4 (input_0: f32[8,128], input_1: f32[64]) -> (f32[2,128], f32[16]) {
  %input_0 = f32[8,128]{1,0:T(8,128)S(1)} parameter(0)
  %input_1 = f32[64]{0:T(128)S(1)} parameter(1)
  %all-reduce.3 = (f32[8,128]{1,0:T(8,128)}, f32[64]{0:T(128)}) all-reduce(%input_0, %input_1), \
channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add.3
  %get-tuple-element.1 = f32[8,128]{1,0:T(8,128)} get-tuple-element(%all-reduce.3), index=0
  %dynamic-slice.1 = f32[2,128]{1,0:T(8,128)S(1)} dynamic-slice(%get-tuple-element.1, %i, %z)
  %get-tuple-element.2 = f32[64]{0:T(128)} get-tuple-element(%all-reduce.3), index=1
  %dynamic-slice.2 = f32[16]{0:T(128)S(1)} dynamic-slice(%get-tuple-element.2, %i)
  ROOT %tuple.1 = (f32[2,128]{1,0:T(8,128)S(1)}, f32[16]{0:T(128)S(1)}) \
tuple(%dynamic-slice.1, %dynamic-slice.2)
}

ENTRY %main (a: f32[4,8], b: bf16[1024]) -> f32[4,8] {
  %a = f32[4,8]{1,0:T(8,128)} parameter(0)
  %b = bf16[1024]{0} parameter(1)
  %all-reduce.1 = (f32[4,8]{1,0:T(8,128)S(1)}, bf16[1024]{0}) all-reduce(%a, %b), \
channel_id=1, to_apply=%add
  %all-gather-start = (bf16[256]{0}, bf16[1024]{0}) all-gather-start(%c), channel_id=2, \
dimensions={0}
  %all-gather-done = bf16[1024]{0} all-gather-done(%all-gather-start)
  %fusion.all-reduce = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused, \
metadata={op_name="all-reduce("}
  ROOT %add.2 = f32[4,8]{1,0} add(%a, %fusion.all-reduce)
}
"""


def test_collectives_are_counted_once_each_with_their_result_bytes():
  found = hlo.collectives(_HLO)
  assert found == {
    "all-reduce": {
      "count": 1,
      "bytes": 4 * 8 * 4 + 1024 * 2,
      "bytes_by_dtype": {"f32": 4 * 8 * 4, "bf16": 1024 * 2},
    },
    # the -done's result, not the start's tuple; chain 7's three copies once
    "all-gather": {
      "count": 2,
      "bytes": 1024 * 2 + 8 * 64 * 2,
      "bytes_by_dtype": {"bf16": 1024 * 2 + 8 * 64 * 2},
    },
    "collective-permute": {"count": 1, "bytes": 16 * 4, "bytes_by_dtype": {"f32": 16 * 4}},
    # the fused all-reduce by the slices it delivers
    "reduce-scatter": {
      "count": 1,
      "bytes": (2 * 128 + 16) * 4,
      "bytes_by_dtype": {"f32": (2 * 128 + 16) * 4},
    },
  }


def test_shape_bytes_reads_arrays_tuples_and_scalars():
  assert hlo.shape_bytes("f32[2,3]{1,0:T(8,128)}") == 24
  assert hlo.shape_bytes("(bf16[10]{0}, pred[4]{0}, s32[])") == 20 + 4 + 4
  assert hlo.shape_bytes_by_dtype("(bf16[10]{0}, f32[2], bf16[3,2])") == {"bf16": 32, "f32": 8}


def test_summary_line_fields():
  line = report.summary_line("v5e:2x2", 4, True, 2.6789, 16, 550.04, 45.0, 23.951, 34.46)
  assert line == (
    "aot topology=v5e:2x2 devices=4 fits=yes hbm_gib=2.68 hbm_capacity_gib=16 "
    "train_gflop_per_image=550.0 eval_gmac_per_image=45.0 train_gb_per_image=23.95 "
    "roofline_images_per_s_per_chip=34.5"
  )
  # A GPU target's compiler counts no bytes: no roofline.
  assert report.summary_line("h100:8", 8, True, 2.5, 80, 547.5, None).endswith(
    "eval_gmac_per_image=skipped train_gb_per_image=unknown roofline_images_per_s_per_chip=unknown"
  )


def test_bad_size_names_the_flag():
  assert report.parse_size("800x1216") == (800, 1216)
  with pytest.raises(ValueError, match="--size='800'"):
    report.parse_size("800")


def test_without_libtpu_the_error_says_which_pip_command_installs_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # as if the wheel were not installed
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(aot_devices.LibtpuMissingError) as e:
    aot_devices.topology_devices("v5e:2x2")
  assert f'pip install "jax[tpu]=={jax.__version__}"' in str(e.value)


def test_macs_count_convolutions_and_matrix_products_only():
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((16, 5), jnp.float32)

  def net(x, k, w):
    y = jax.lax.conv_general_dilated(
      x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = jax.nn.softmax(jax.nn.relu(y) * 3.0)  # elementwise: not counted
    return jax.jit(lambda a: jnp.einsum("bhwc,cd->bhwd", a, w))(y)  # nested call: counted

  r = flops.macs(net, x, k, w)
  assert r["conv"] == 2 * 4 * 4 * 16 * (3 * 3 * 3)
  assert r["dot"] == 2 * 4 * 4 * 5 * 16
  assert r["total"] == r["conv"] + r["dot"]


@pytest.mark.slow
def test_aot_compiles_the_tiny_train_step_for_a_tpu_slice():
  env = processes.libtpu_env()
  if env is None:
    if os.environ.get("CI"):
      pytest.fail("libtpu is missing: .ci/run installs it into $CONDDETR_LIBTPU_PATH")
    pytest.skip(
      f"libtpu is not installed ({aot_devices.install_command()}, or see "
      "requirements-tpu-compiler.txt)"
    )
  proc = processes.run_python_ok(
    "-m",
    "conddetr_jax.aot",
    "--config=configs/test_tiny.py",
    "--topology=v5e:2x2",
    "--size=64x64",
    env=env,
    timeout=900,
  )
  last = proc.stdout.strip().splitlines()[-1]
  fields = dict(kv.split("=", 1) for kv in last.split()[1:])
  assert last.startswith("aot ") and fields["topology"] == "v5e:2x2" and fields["devices"] == "4"
  assert fields["fits"] == "yes" and fields["hbm_capacity_gib"] == "16"
  for key in (
    "hbm_gib",
    "train_gflop_per_image",
    "eval_gmac_per_image",
    "train_gb_per_image",
    "roofline_images_per_s_per_chip",
  ):
    assert float(fields[key]) > 0, last
  # The state is split (config.shard_state): the weights are gathered, and the float32 gradients
  # summed over the data axis, each device keeping its slice.
  assert "state split over 'data'" in proc.stdout
  assert re.search(r"all-gather x\d+ [\d.]+ MiB", proc.stdout), proc.stdout
  assert re.search(r"reduce-scatter x\d+ [\d.]+ MiB \(f32 [\d.]+", proc.stdout), proc.stdout
  assert re.search(
    r"interconnect, ESTIMATE .* receives [\d.]+ MiB .* at v5e's 400 GB/s .* [\d.]+ ms per chip, "
    r"against [\d.]+ ms of the step's FLOPs",
    proc.stdout,
  ), proc.stdout
  assert re.search(r"ESTIMATE \(not a measurement\) [\d.]+ images/s per chip", proc.stdout)
  # The per-stage table (on by default for a TPU target) and the matcher's loops, counted once.
  assert "per-stage cost of one train step" in proc.stdout and "  whole step  " in proc.stdout
  assert re.search(r"loops in the compiled step \(\d+ while loops.*matching\.py:", proc.stdout)
  assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "TPU_ACCELERATOR_TYPE" not in proc.stderr
  assert "oneDNN" not in proc.stderr  # the command quiets TensorFlow's load-time notice too


def test_default_size_is_the_config_buckets_or_the_originals_largest_rounded_up():
  from configs import r50, test_tiny  # pylint: disable=g-import-not-at-top

  assert report.default_sizes(test_tiny.get_config()) == [(64, 64)]
  assert report.default_sizes(r50.get_config()) == [
    (832, 1216)
  ]  # 800x1216 rounded up to multiples of 64


def test_an_out_of_memory_compile_is_reported_as_not_fitting_with_the_needed_bytes():
  def lower():
    raise RuntimeError(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
      "hbm. Used 17.52G of 15.75G hbm. Exceeded hbm capacity by 1.77G."
    )

  with pytest.raises(compiling.DoesNotFitError) as e:
    compiling.compile_lowered(lambda: type("L", (), {"compile": staticmethod(lower)})())
  assert e.value.needed_bytes == pytest.approx(17.52 * 2**30)
  assert e.value.capacity_bytes == pytest.approx(15.75 * 2**30)
  with pytest.raises(ValueError):  # other compile errors pass through unchanged
    compiling.compile_lowered(lambda: (_ for _ in ()).throw(ValueError("bad shape")))


def test_a_refusal_that_names_only_the_temporaries_is_read_too():
  # libtpu 0.0.42.1's words for DC5-R50 at 3 images of 800x1216 per v5e chip.
  e = compiling.DoesNotFitError(
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (17.62G) exceeds available HBM (15.75G)."
  )
  assert e.needed_bytes is None and e.temp_bytes == pytest.approx(17.62 * 2**30)
  assert e.capacity_bytes == pytest.approx(15.75 * 2**30)
  assert e.peak_estimate(0.5 * 2**30) == pytest.approx(18.12 * 2**30)
  assert e.describe_need() == " (the compiler: 17.62 GiB of temporaries alone needed)"


class _FakeSliceCompiler:
  """Compiles nothing: a train step of 0.5 GiB of state and 0.8 GiB of temporaries per image,
  refused (in libtpu's words) when its temporaries exceed 15.75 GiB."""

  def __init__(self):
    self.compiled = []

  def train(self, n, hw):
    self.compiled.append(n)
    temp = 0.8 * n * 2**30
    if temp > 15.75 * 2**30:
      raise compiling.DoesNotFitError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        f"temporaries ({temp / 2**30:.2f}G) exceeds available HBM (15.75G)."
      )
    return compiling.Compiled(
      seconds=1.0,
      argument_bytes=2**29,
      output_bytes=0,
      alias_bytes=0,
      temp_bytes=int(temp),
      code_bytes=0,
      flops=1.0,
      collectives={},
    )


def test_max_batch_confirms_the_predicted_batch_and_prints_one_readable_line_per_try():
  compiler, lines = _FakeSliceCompiler(), []
  best = compiling.search_max_batch(
    compiler, (800, 1216), 2, compiler.train(2, (800, 1216)), 16, lines.append
  )
  # 0.5 + 0.8 * 19 = 15.7 GiB fits 16 GiB; 20's temporaries alone, 16 GiB, exceed the compiler's
  # 15.75.
  assert best == 19
  assert compiler.compiled == [
    2,
    4,
    19,
    20,
  ]  # the configured batch, doubling, the prediction, the next batch
  assert [line.strip() for line in lines] == [
    "max_batch try 2/device (the configured batch, compiled above): peak 2.10 GiB: fits",
    "max_batch try 4/device (doubling): peak 3.70 GiB: fits [compile 0 s]",
    "max_batch try 19/device (the line through the peaks at 2 and 4 reaches the capacity at 19.4): "
    "peak 15.70 GiB: fits [compile 0 s]",
    "max_batch try 20/device (to confirm: the line through the peaks at 4 and 19 reaches the "
    "capacity at 19.4): needs about "
    "16.50 GiB of the compiler's 15.75: does not fit [compile 0 s]",
    "largest per-device train batch that fits 16 GiB: 19 (19 fits, 20 does not); 3 compiles",
  ]


# A batch-sharded dropout compiled by the train step's jit (``parallel.JitParallel``) for a v5e
# slice of 4 chips: prints the optimized HLO's rng-bit-generator results and whether its mask is
# still the hash of the element index (an iota), fused into the masked product.
_DROPOUT_STEP = """
import jax, jax.numpy as jnp
from conddetr_jax import sharding
from conddetr_jax.aot import devices
from conddetr_jax.models.dropout import Dropout
from conddetr_jax.training import parallel

mesh = sharding.make_mesh(devices.topology_devices("v5e:2x2"))

def step(state, batch):
  rng = jax.random.wrap_key_data(state["rng"], impl="rbg")
  y = Dropout(0.1).apply({}, batch["x"], deterministic=False, rng=rng)
  return state, {"sum": jnp.sum(y.astype(jnp.float32))}

par = parallel.JitParallel(step, mesh)
key = jax.random.key_data(jax.random.key(0, impl="rbg"))
state = {"rng": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))}
x = jax.ShapeDtypeStruct((8, 64, 256), jnp.bfloat16, sharding=par.batch_sharding)
text = par.lower(state, {"x": x}).compile().as_text()
for line in text.splitlines():
  if "rng-bit-generator(" in line:
    print("RNG", line.split("=", 1)[1].split("rng-bit-generator(")[0].strip())
print("IOTA", " iota(" in text)
"""


@pytest.mark.slow
def test_the_tpu_train_step_keeps_no_dropout_bits_in_memory():
  # The masks are a hash of the element index (models/dropout.py): the step's only random bits
  # are each mask's two 32-bit seeds, however large the mask, and the iota it hashes is there.
  env = processes.libtpu_env()
  if env is None:
    pytest.skip(f"libtpu is not installed ({aot_devices.install_command()})")
  proc = processes.run_python_ok("-c", _DROPOUT_STEP, env=env, timeout=600)
  shapes = re.findall(r"^RNG .*?\[([\d,]*)\]", proc.stdout, re.MULTILINE)
  assert shapes, proc.stdout
  assert all(math.prod(int(n) for n in s.split(",") if n) <= 4 for s in shapes), proc.stdout
  assert "IOTA True" in proc.stdout, proc.stdout
