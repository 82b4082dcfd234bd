"""benchmarks/accelerator.py runs end to end on the CPU with tiny shapes and writes its JSON, the
PyTorch (HF transformers) side by side included; on 2 devices, as on a GPU node, so that the
train state is split over them as the step takes it."""

import json

import pytest

from tests import conftest, processes


@pytest.mark.slow
def test_accelerator_benchmark_runs_tiny_on_cpu(tmp_path):
  out = tmp_path / "acc.json"
  proc = processes.run_python_ok(
    "benchmarks/accelerator.py",
    "--tiny",
    "--dtypes=float32",
    "--batches=1",
    "--steps=1",
    "--hf=yes",
    "--hf_batch=1",
    f"--out={out}",
    env=processes.cpu_env(XLA_FLAGS=conftest.cpu_devices_xla_flags(2)),
    timeout=900,
  )
  report = json.loads(out.read_text())
  (train,) = report["train"]
  assert (
    train["per_device_batch"] == 1 and train["images_per_s"] > 0 and train["flops_per_device"] > 0
  )
  assert train["mfu"] is None  # the CPU has no peak in the table: no made-up MFU
  # The CPU's cost analysis counts bytes, but the CPU has no peak or bandwidth: no roofline, said.
  assert train["bytes_accessed_per_device"] > 0 and train["roofline_images_per_s"] is None
  assert report["roofline_note"].startswith("no roofline: no peak or bandwidth known for")
  assert {m["solver"] for m in report["matcher"]} == {"hungarian", "scipy"}
  assert all(m["seconds"] > 0 for m in report["matcher"])
  assert report["eval"][0]["images_per_s"] > 0
  (hf,) = report["hf"]  # PyTorch's step at the same batch, on the CPU here (on a GPU there)
  assert hf["device"] == "cpu" and hf["batch"] == 1 and hf["images_per_s"] > 0
  # One device against PyTorch's one: JAX's images/s per device.
  assert report["devices"] == 2
  assert hf["jax_over_hf"] == pytest.approx(train["images_per_s"] / 2 / hf["images_per_s"])
  last = proc.stdout.strip().splitlines()[-1]
  assert (
    last.startswith("accelerator best_images_per_s=")
    and "roofline_images_per_s_at_best=nan" in last
    and f"jax_over_hf_float32={hf['jax_over_hf']:.2f}" in last
  )
