"""Where the train step's memory traffic goes: XLA's FLOPs and bytes accessed of the TPU program,
and the instructions and model parts that move the most bytes. No TPU needed (libtpu compiles).

Usage:
  PYTHONPATH=$CONDDETR_LIBTPU_PATH python benchmarks/step_bytes.py --config=configs/r50.py \
      --config.model.dtype=bfloat16 --config.per_device_batch_size=2 [--size=800x1216]
      [--topology=v5e:2x2] [--top=25] [--depth=3] [--hlo=step.hlo.txt]

Compiles the train step exactly as ``python -m conddetr_jax.aot`` does (``aot.compiling``'s
``SliceCompiler``: the run's step and state layout, batch split over the slice) and prints the
program's ``cost_analysis()`` per chip: GFLOP, GB accessed, and both per image.

Then an attribution, from the optimized HLO text (``compiled.as_text()``): every instruction of a
computation that is not a fusion's body (so each fusion counts once, as a kernel) is charged the
bytes of its operands plus its result. That is an estimate of what XLA's cost analysis counts (it
counts only the parts of an operand a fusion reads, and in-place updates less), printed with its
total so the two can be compared. Loop bodies count once, as in the cost analysis. Printed: the
``--top`` instructions, then the totals per model part: the instruction's JAX ``op_name`` cut to
``--depth`` module names, split by whether it runs in the forward or the backward pass.

Last, an estimate of the HBM traffic alone: the same operands and results, but only those whose
layout puts them in HBM (no memory space ``S(n)``: ``S(1)`` is the TPU's on-chip VMEM), and each
asynchronous copy between the two (``copy-start``/``copy-done``, ``slice-start``/``slice-done``)
once, at its HBM end. XLA's bytes accessed counts every instruction's operands and results in
whichever memory they live, plus those copies (docs/accelerators.md, "What the counts leave out"):
each copy four times what it delivers (``async_moved_gb_per_chip`` in the summary line is what
they deliver). ``--calibrate`` measures that factor on one small program for ``--topology``.
"""

import collections
import os
import re
import sys
from typing import Iterator

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from conddetr_jax import cli
from conddetr_jax.aot import compiling, hlo, report, stages
from conddetr_jax.aot import devices as devices_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/r50.py", "Model config.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU slice to compile for.")
_SIZE = flags.DEFINE_string("size", "800x1216", "HxW of the padded batch.")
_TOP = flags.DEFINE_integer("top", 25, "Instructions to list, largest traffic first.")
_DEPTH = flags.DEFINE_integer("depth", 3, "Module names kept of an op_name in the per-part table.")
_HLO = flags.DEFINE_string("hlo", "", "Also write the optimized HLO text to this file.")
_CALIBRATE = flags.DEFINE_bool(
  "calibrate",
  False,
  "Instead of the step: compile one weight-gradient product whose operand the TPU compiler "
  "prefetches into on-chip memory, and print what XLA's bytes accessed counts for the copy.",
)
_READ_HLO = flags.DEFINE_string(
  "read_hlo", "", "Attribute the traffic of this saved HLO text (--hlo) instead of compiling."
)

# Instructions that move no data of their own (views, tuples, control flow around bodies that are
# counted themselves).
_FREE_OPS = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "call",
  "conditional",
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_BODY_REFERENCE = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# An array of an HLO shape with its layout, e.g. ``bf16[2,8]{1,0:T(8,128)(2,1)S(1)}``.
_LAID_OUT_ARRAY = re.compile(r"[a-z]+\d*\[[\d,]*\](?:\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\(\d+\)")  # a memory space other than HBM's (the default, unnamed)
_ASYNC_MOVE_START = {"copy-start", "slice-start"}
_ASYNC_MOVE_DONE = {"copy-done", "slice-done"}
_NAME = re.compile(r"%([\w.\-]+)")
# A JAX transformation's name wrapping a module path: jvp(...), transpose(...), remat(...), ...
_TRANSFORM = re.compile(r"^(\w+)\((.*)\)$")


def _computations(text: str) -> Iterator[tuple[str, list[str]]]:
  """(name, instruction lines) of each computation of an HLO module's text."""
  name, lines = None, []
  for line in text.splitlines():
    if name is None:
      if m := _COMPUTATION.match(line):
        name, lines = m[1], []
    elif line.strip() == "}":
      yield name, lines
      name = None
    else:
      lines.append(line)


def hbm_bytes(shape: str) -> int:
  """Bytes of the arrays of an HLO shape (an array or a tuple) whose layout puts them in HBM."""
  return sum(
    hlo.shape_bytes(array) for array in _LAID_OUT_ARRAY.findall(shape) if not _ON_CHIP.search(array)
  )


def _operands(rest: str) -> list[str]:
  """The names of an instruction's operands: the %names in ``rest`` up to the parenthesis closing
  its op's."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return _NAME.findall(rest[:i])
  return _NAME.findall(rest)


def instruction_traffic(text: str) -> list[dict]:
  """Each kernel-level instruction of ``text`` with its estimated bytes (operands + result), the
  part of them in HBM (``hbm_bytes``; an asynchronous copy's start counts its HBM source, its done
  its HBM destination, each what the copy delivers), its op, result shape and JAX op_name (a
  fusion without one: the first op_name of its body), largest first."""
  computations = dict(_computations(text))
  parsed = {
    comp: [(m, line) for line in lines if (m := _INSTRUCTION.match(line))]
    for comp, lines in computations.items()
  }
  shapes = {m["name"]: m["shape"] for rows in parsed.values() for m, _ in rows}
  bodies, first_op_name = set(), {}
  for comp, rows in parsed.items():
    for m, line in rows:
      bodies.update(_BODY_REFERENCE.findall(line))
      if comp not in first_op_name and (name := _OP_NAME.search(line)):
        first_op_name[comp] = name[1]
  rows = []
  for comp, instructions in parsed.items():
    if comp in bodies:
      continue
    for m, line in instructions:
      if m["op"] in _FREE_OPS:
        continue
      name = _OP_NAME.search(line)
      body = _BODY_REFERENCE.search(line)
      op_name = name[1] if name else first_op_name.get(body[1], "") if body else ""
      operand_shapes = [shapes.get(o, "") for o in _operands(m["rest"])]
      operand_bytes = sum(hlo.shape_bytes(shape) for shape in operand_shapes)
      if m["op"] in _ASYNC_MOVE_START:
        # What it reads from HBM is what it delivers (its tuple's second array: a copy's source,
        # a slice's result), not the whole operand a slice is cut from.
        from_hbm = any(hbm_bytes(shape) for shape in operand_shapes)
        in_hbm = hlo.shape_bytes(_LAID_OUT_ARRAY.findall(m["shape"])[1]) if from_hbm else 0
      elif m["op"] in _ASYNC_MOVE_DONE:
        in_hbm = hbm_bytes(m["shape"])
      else:
        in_hbm = hbm_bytes(m["shape"]) + sum(hbm_bytes(shape) for shape in operand_shapes)
      rows.append(
        {
          "bytes": hlo.shape_bytes(m["shape"]) + operand_bytes,
          "hbm_bytes": in_hbm,
          "op": m["op"],
          "shape": re.sub(r"\{[^}]*\}", "", m["shape"]),
          "name": m["name"],
          "op_name": op_name,
        }
      )
  return sorted(rows, key=lambda r: -r["bytes"])


def model_part(op_name: str, depth: int) -> tuple[str, str]:
  """(module path cut to ``depth`` names, 'bwd' or 'fwd') of a JAX op_name such as
  ``jit(step)/transpose(jvp(ConditionalDETR))/backbone/layer2_0/conv1/dot_general``."""
  parts = op_name.split("/")[1:]  # drop jit(...)
  backward = False
  path = []
  for part in parts:
    while m := _TRANSFORM.match(part):
      backward |= m[1] == "transpose"
      part = m[2]
    path.append(part)
  return "/".join(path[: depth + 1]) or "(no op_name)", "bwd" if backward else "fwd"


def moved_bytes(rows: list[dict]) -> int:
  """Bytes delivered by the asynchronous copies between HBM and on-chip memory among
  ``instruction_traffic``'s rows (each pair once, by its done's result). XLA's bytes accessed
  counts each of them four times (``--calibrate``; docs/accelerators.md)."""
  return sum(hlo.shape_bytes(r["shape"]) for r in rows if r["op"] in _ASYNC_MOVE_DONE)


def print_traffic(text: str, top: int, depth: int) -> tuple[float, float, float]:
  """Prints the ``top`` instructions and model parts of ``instruction_traffic(text)``, then the HBM
  estimate; returns (estimated total bytes, estimated HBM bytes, ``moved_bytes``)."""
  rows = instruction_traffic(text)
  print(f"top {top} instructions by estimated traffic (operands + result):")
  for r in rows[:top]:
    print(
      f"  {r['bytes'] / 1e9:7.3f} GB  {r['op']:<14} {r['shape'][:60]:<60} {r['op_name'][-110:]}"
    )
  parts: dict[tuple[str, str], float] = collections.defaultdict(float)
  for r in rows:
    parts[model_part(r["op_name"], depth)] += r["bytes"]
  print(f"estimated traffic per model part (op_name to depth {depth}), largest first:")
  for (part, direction), b in sorted(parts.items(), key=lambda kv: -kv[1])[: 3 * top]:
    print(f"  {b / 1e9:7.3f} GB  {direction}  {part}")
  moves = [r for r in rows if r["op"] in _ASYNC_MOVE_START | _ASYNC_MOVE_DONE]
  hbm = sum(r["hbm_bytes"] for r in rows)
  moved = moved_bytes(rows)
  print(
    f"estimated HBM traffic: {hbm / 1e9:.2f} GB ({sum(r['hbm_bytes'] for r in moves) / 1e9:.2f} "
    f"of it by {len(moves) // 2} asynchronous copies between HBM and on-chip memory, which move "
    f"{moved / 1e9:.2f} GB: XLA's bytes accessed counts those {4 * moved / 1e9:.2f} GB)"
  )
  return sum(r["bytes"] for r in rows), hbm, moved


def calibrate(topology: str) -> None:
  """Compiles ``einsum('bhwc,bhwd->cd')`` (a 1x1 convolution's weight gradient: R50 layer2's
  first, bf16, 2 images of 800x1216 per chip) for ``topology`` and prints XLA's bytes accessed
  beside the program's kernels: the product's fusion, and the copy that prefetches its
  activation into on-chip memory."""
  devices = devices_lib.devices_of(topology)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  abstract = lambda channels: jax.ShapeDtypeStruct(
    (2 * len(devices), 200, 304, channels), jnp.bfloat16, sharding=split
  )
  product = lambda x, g: jnp.einsum("bhwc,bhwd->cd", x, g, preferred_element_type=jnp.float32)
  compiled = jax.jit(product).lower(abstract(256), abstract(128)).compile()
  counted = stages.cost_of(compiled).bytes_accessed
  rows = instruction_traffic(compiled.as_text())
  kernels = sum(r["bytes"] for r in rows if r["op"] not in _ASYNC_MOVE_START | _ASYNC_MOVE_DONE)
  moved = moved_bytes(rows)
  if not moved:
    print(f"step_bytes calibrate topology={topology}: the compiler placed no asynchronous copy")
    return
  print(
    f"step_bytes calibrate topology={topology} xla_bytes_accessed_mb={counted / 1e6:.1f} "
    f"kernels_mb={kernels / 1e6:.1f} moved_mb={moved / 1e6:.1f} "
    f"counted_per_moved_byte={(counted - kernels) / moved:.2f}"
  )


def main(argv: list[str]) -> None:
  del argv
  if _READ_HLO.value:
    with open(_READ_HLO.value, encoding="utf-8") as f:
      estimated, hbm, moved = print_traffic(f.read(), _TOP.value, _DEPTH.value)
    print(
      f"step_bytes estimated_gb={estimated / 1e9:.2f} estimated_hbm_gb={hbm / 1e9:.2f} "
      f"async_moved_gb={moved / 1e9:.2f}"
    )
    return
  jax.config.update("jax_platforms", "cpu")
  if _CALIBRATE.value:
    calibrate(_TOPOLOGY.value)
    return
  config = _CONFIG.value.copy_and_resolve_references()
  config.global_batch_size, config.grad_accum_steps = 0, 1
  hw = report.parse_size(_SIZE.value)
  batch = config.per_device_batch_size
  compiler = compiling.SliceCompiler(config, devices_lib.devices_of(_TOPOLOGY.value))
  compiled = compiler.train(batch, hw)
  cost = stages.cost_of(compiled.executable)
  text = compiled.executable.as_text()
  if _HLO.value:
    with open(_HLO.value, "w", encoding="utf-8") as f:
      f.write(text)
  estimated, hbm, moved = print_traffic(text, _TOP.value, _DEPTH.value)
  m = config.model
  print(
    f"step_bytes model={m.backbone}{'_dc5' if m.dilation else ''} dtype={m.dtype} "
    f"topology={_TOPOLOGY.value} size={hw[0]}x{hw[1]} per_chip_batch={batch} "
    f"gflop_per_chip={cost.flops / 1e9:.3f} gb_per_chip={cost.bytes_accessed / 1e9:.2f} "
    f"gflop_per_image={cost.flops / batch / 1e9:.1f} "
    f"gb_per_image={cost.bytes_accessed / batch / 1e9:.2f} "
    f"flop_per_byte={cost.flops_per_byte:.1f} estimated_gb_per_chip={estimated / 1e9:.2f} "
    f"estimated_hbm_gb_per_chip={hbm / 1e9:.2f} async_moved_gb_per_chip={moved / 1e9:.2f} "
    f"temp_gib={compiled.temp_bytes / 2**30:.2f}"
  )


if __name__ == "__main__":
  cli.run(main)
