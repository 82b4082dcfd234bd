"""Reading a compiled XLA program's text: the collectives it runs and the bytes they move."""

import re

import numpy as np

COLLECTIVE_OPS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)
_BYTES_PER_ELEMENT = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\("
)
_CHAIN_ID = re.compile(r'chain_id="(\d+)"')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) \(.*\) -> (?P<result>.*) \{$")
# The TPU compiler's fusion of an all-reduce with the dynamic slices that keep each device's part
# of the sum: a reduce-scatter, in the compiler's spelling.
_ALL_REDUCE_SCATTER = "all-reduce-scatter"
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subfc]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")


def shape_bytes_by_dtype(shape: str) -> dict[str, int]:
  """Bytes of an HLO result shape per element type: ``(f32[2,3]{1,0}, bf16[4])`` -> {f32: 24, bf16:
  8}."""
  total: dict[str, float] = {}
  for m in _ARRAY.finditer(shape):
    dims = [int(d) for d in m["dims"].split(",") if d]
    size = _BYTES_PER_ELEMENT.get(m["dtype"], 1)  # f8 variants: 1 byte
    total[m["dtype"]] = total.get(m["dtype"], 0) + size * (int(np.prod(dims)) if dims else 1)
  return {dtype: int(b) for dtype, b in total.items()}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO result shape: an array ``f32[2,3]{1,0}`` or a tuple of them."""
  return sum(shape_bytes_by_dtype(shape).values())


def collectives(hlo_text: str) -> dict[str, dict]:
  """Counts and result bytes of the collectives of an HLO module's text (``compiled.as_text()``).

  A synchronous collective counts by its result; an asynchronous pair (``all-reduce-start`` /
  ``all-reduce-done``) counts once, by the ``-done``'s result (the data it delivers). Each
  instruction counts once, even inside a loop body (a static count). The TPU compiler's
  asynchronous collective fusions hold a copy of their collective in each of their computations
  (the start's, the done's, the continuations'), all marked with the chain's
  ``frontend_attributes={chain_id="N"}``: a chain counts once. An all-reduce inside the TPU
  compiler's ``all-reduce-scatter`` fusion (the sum of which each device keeps one slice) counts
  as a ``reduce-scatter``, by the fusion's result: the slices.

  Returns:
    {op: {"count": n, "bytes": b, "bytes_by_dtype": {dtype: b}}} for each collective present, e.g.
    ``all-reduce``; ``bytes_by_dtype`` says in which element types the data moves (e.g. whether
    gradients are summed in bf16 or f32).
  """
  found: dict[str, dict] = {}
  chains_seen = set()
  computation = None
  for line in hlo_text.splitlines():
    if header := _COMPUTATION.match(line):
      computation = header
      continue
    if line.startswith("}"):
      computation = None
      continue
    m = _INSTRUCTION.match(line)
    if m is None:
      continue
    op = m["op"]
    if op.endswith("-start"):
      continue
    base = op[: -len("-done")] if op.endswith("-done") else op
    if base not in COLLECTIVE_OPS:
      continue
    shape = m["shape"]
    if base == "all-reduce" and computation and computation["name"].startswith(_ALL_REDUCE_SCATTER):
      base, shape = "reduce-scatter", computation["result"]
    if chain := _CHAIN_ID.search(line):
      if (base, chain[1]) in chains_seen:
        continue
      chains_seen.add((base, chain[1]))
    entry = found.setdefault(base, {"count": 0, "bytes": 0, "bytes_by_dtype": {}})
    entry["count"] += 1
    for dtype, b in shape_bytes_by_dtype(shape).items():
      entry["bytes"] += b
      entry["bytes_by_dtype"][dtype] = entry["bytes_by_dtype"].get(dtype, 0) + b
  return found


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")
_STACK_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _id_tables(hlo_text: str) -> dict[str, dict[str, str]]:
  """The module's header tables (FileNames, FunctionNames, FileLocations, StackFrames): name ->
  {id: the row's text}."""
  tables: dict[str, dict[str, str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line.startswith(("HloModule", "%", "ENTRY")) or not line.strip():
      current = None if line.startswith(("%", "ENTRY")) else current
      continue
    m = _TABLE_ROW.match(line)
    if m is None:
      current = tables.setdefault(line.strip(), {})
    elif current is not None:
      current[m[1]] = m[2]
  return tables


def _source_of(frame_id: str, tables: dict[str, dict[str, str]]) -> str:
  """'file.py:line (function)' of a stack frame, or '?' where the tables lack it."""
  frame = dict(_FIELD.findall(tables.get("StackFrames", {}).get(frame_id, "")))
  where = dict(
    _FIELD.findall(tables.get("FileLocations", {}).get(frame.get("file_location_id"), ""))
  )
  if not where:
    return "?"
  path = tables.get("FileNames", {}).get(where.get("file_name_id"), "?").strip('"')
  function = tables.get("FunctionNames", {}).get(where.get("function_name_id"), "?").strip('"')
  return f"{path.rsplit('/', 1)[-1]}:{where.get('line', '?')} ({function})"


def while_loops(hlo_text: str) -> list[dict]:
  """The while loops of a compiled program's text: where each comes from and its trip count.

  XLA's ``cost_analysis`` counts a loop's body once, whatever its trip count, so these are the
  places where its FLOPs and bytes fall short of what runs.

  Returns:
    One {"source": "file.py:line (function)", "trip_count": n or None (known only when XLA
    proved it)} per ``while`` instruction, nested ones included.
  """
  tables = _id_tables(hlo_text)
  loops = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m is None or m["op"] != "while":
      continue
    frame = _STACK_FRAME.search(line)
    trips = _TRIP_COUNT.search(line)
    loops.append(
      {
        "source": _source_of(frame[1], tables) if frame else "?",
        "trip_count": int(trips[1]) if trips else None,
      }
    )
  return loops
