"""The ahead-of-time compile tool (conddetr_jax.aot) for NVIDIA GPU nodes, on a machine without a
GPU."""

import os
import re
import sys

import pytest

from conddetr_jax.aot import compiling
from conddetr_jax.aot import devices as aot_devices
from conddetr_jax.hardware import gpu_targets
from tests import processes


def test_gpu_topology_names_give_the_gpu_the_hosts_and_the_gpus_per_host():
  one_host = gpu_targets.parse_topology("h100:8")
  assert (one_host.gpu.name, one_host.hosts, one_host.per_host, one_host.devices) == (
    "h100",
    1,
    8,
    8,
  )
  two_hosts = gpu_targets.parse_topology("h100:2x8")
  assert (two_hosts.hosts, two_hosts.devices, two_hosts.topology_string) == (2, 16, "1x2x8")
  assert gpu_targets.parse_topology("gpu:4").gpu.name == gpu_targets.DEFAULT_GPU
  assert gpu_targets.parse_topology("V100-16G:8").gpu.memory_gib == 16
  for tpu in ("v5e:2x2", "v5p:2x2x1", "v4:2x2x2"):  # TPU slices are left to libtpu
    assert gpu_targets.parse_topology(tpu) is None
  with pytest.raises(ValueError, match="at least 1"):
    gpu_targets.parse_topology("h100:0")


def test_each_gpu_is_described_completely_and_found_again_by_its_driver_name():
  for gpu in gpu_targets.GPUS.values():
    text = gpu.target_config()  # a compute capability without limits would raise here
    major, minor = gpu.compute_capability
    assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text
    assert f"device_memory_size: {int(gpu.memory_gib * 2**30)}" in text
    assert gpu_targets.by_device_kind(gpu.device_kind) is gpu
    chip = aot_devices.chip_of(type("Device", (), {"device_kind": gpu.device_kind})())
    assert (chip.name, chip.hbm_gib, chip.bf16_tflops) == (
      gpu.name,
      gpu.memory_gib,
      gpu.bf16_tflops,
    )
  assert {g.compute_capability for g in gpu_targets.GPUS.values()} == {(7, 0), (8, 0), (9, 0)}


def test_without_the_gpu_compiler_the_error_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax_plugins", None)  # as if no JAX plugin were installed
  monkeypatch.delenv(aot_devices.GPU_COMPILER_PATH_VAR, raising=False)
  with pytest.raises(aot_devices.CompilerMissingError) as e:
    aot_devices.devices_of("h100:8")
  assert "-r requirements-gpu-compiler.txt" in str(
    e.value
  ) and aot_devices.GPU_COMPILER_PATH_VAR in str(e.value)


# XLA's GPU compiler's words when its Triton GEMM emitter finds no tiling without autotuning (the
# R50 train step with xla_gpu_enable_triton_gemm left on), shortened: the real one goes on with the
# whole fusion computation.
_TRITON_FAILURE = """\
INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.17 = bf16[19456,256]{1,0} \
dot(%bitcast.2041, %convert.511), lhs_contracting_dims={1}, rhs_contracting_dims={0}, \
metadata={op_name="jit(step)/jvp(ConditionalDETR)/transformer/encoder/layers_0/self_attn/\
out_proj/dot_general" source_file="conddetr_jax/models/attention.py" source_line=80}
%fused_computation.1017 (param_0.3921: bf16[256,256]) -> bf16[19456,256] {
  %param_0.3921 = bf16[256,256]{1,0} parameter(0)
  ROOT %dot.17 = bf16[19456,256]{1,0} dot(%bitcast.2041, %convert.511)
}
""" + "\n".join(f"  %fusion.{i} = f32[8]{{0}} fusion(%p.{i}), kind=kLoop" for i in range(200))


def test_a_failed_gpu_compile_is_one_line_naming_the_instruction_and_the_model_op():
  line = compiling.compile_error_line(_TRITON_FAILURE)
  assert "\n" not in line and len(line) < 400
  assert line.startswith(
    "INTERNAL: Couldn't find output tile sizes that satisfy [at instruction %dot.17 (dot); "
  )
  assert "%dot.17 (dot)" in line
  assert "encoder/layers_0/self_attn/out_proj/dot_general" in line
  cudnn = (
    "UNIMPLEMENTED: no algorithm for %cudnn-conv.3 = (f32[2,8,8,16]{3,2,1,0}, u8[0]{0}) "
    "custom-call(%a, %b), "
    'window={size=3x3}, custom_call_target="__cudnn$convForward", '
    'metadata={op_name="jit(step)/backbone/conv"}'
  )
  assert compiling.compile_error_line(cudnn).endswith(
    "[at instruction %cudnn-conv.3 (custom-call); custom call __cudnn$convForward; from JAX op "
    "jit(step)/backbone/conv]"
  )


def _gpu_compiler_env() -> dict[str, str] | None:
  """This process's environment if it finds the GPU compiler (installed here, or in
  ``$CONDDETR_GPU_COMPILER_PATH``, where .ci/run installs it); None otherwise."""
  folder = os.environ.get(aot_devices.GPU_COMPILER_PATH_VAR)
  if aot_devices.gpu_compiler_importable() or (
    folder and os.path.isdir(os.path.join(folder, "jax_plugins", "xla_cuda12"))
  ):
    return dict(os.environ)
  return None


@pytest.mark.slow
def test_aot_compiles_the_tiny_train_step_for_a_v100_node():
  env = _gpu_compiler_env()
  if env is None:
    if os.environ.get("CI"):
      pytest.fail(
        "the GPU compiler is missing: .ci/run installs it into "
        f"${aot_devices.GPU_COMPILER_PATH_VAR}"
      )
    pytest.skip(f"the GPU compiler is not installed ({aot_devices.gpu_install_command()})")
  # The V100 (compute capability 7.0): the GPU that CUDA 13's compiler no longer serves.
  proc = processes.run_python_ok(
    "-m",
    "conddetr_jax.aot",
    "--config=configs/test_tiny.py",
    "--topology=v100-16g:8",
    "--size=64x64",
    "--noeval",
    "--config.parallel=pmap",  # the tool compiles the jit strategy all the same
    env=env,
    timeout=900,
  )
  last = proc.stdout.strip().splitlines()[-1]
  fields = dict(kv.split("=", 1) for kv in last.split()[1:])
  assert last.startswith("aot ") and fields["topology"] == "v100-16g:8" and fields["devices"] == "8"
  assert fields["fits"] == "yes" and fields["hbm_capacity_gib"] == "16"
  assert 0 < float(fields["hbm_gib"]) < 1 and float(fields["train_gflop_per_image"]) > 0
  assert "Tesla V100-SXM2-16GB" in proc.stdout
  # The jit strategy's split state (config.shard_state), though pmap was asked for: float32
  # weights gathered over the 8 GPUs, gradients summed with each GPU receiving its slice.
  assert "state split over 'data'" in proc.stdout
  assert re.search(r"all-gather x\d+ [\d.]+ MiB \(f32 ", proc.stdout), proc.stdout
  assert re.search(r"reduce-scatter x\d+ [\d.]+ MiB \(f32 ", proc.stdout), proc.stdout
  # NVLink's time for them; no bf16 peak to set it beside.
  assert re.search(
    r"interconnect, ESTIMATE .* at v100-16g's 300 GB/s .* ms per chip\n", proc.stdout
  )
  assert "of bf16 peak" not in proc.stdout  # a V100 has no bfloat16 peak to estimate from
