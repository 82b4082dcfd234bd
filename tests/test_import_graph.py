"""The package's layout as a house of floors: no import runs in a circle or up a floor.

The floors are written down below, lowest first. A module may import modules of its own floor or
of lower floors; imports within a floor must not form a circle either. Every module of the package
(and the entry-point scripts) must be placed on a floor, so a new module states where it belongs.

The graph is read from the source with ``ast`` (imports inside functions included), so this test
needs neither JAX nor TensorFlow and runs in well under a second.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "conddetr_jax"
ENTRY_POINTS = ("train", "eval", "predict")  # the scripts at the repository root

# Lowest floor first. A name covers the module or package of that name and everything inside it.
FLOORS = (
  (
    "building blocks",
    (
      "conddetr_jax.configs",
      "conddetr_jax.storage",
      "conddetr_jax.cli",
      "conddetr_jax.progress",
      "conddetr_jax.visualize",
      "conddetr_jax.models",
      "conddetr_jax.data",
      "conddetr_jax.hardware",
    ),
  ),
  ("criterion", ("conddetr_jax.criterion",)),
  ("devices and checkpoints", ("conddetr_jax.sharding", "conddetr_jax.checkpoints")),
  ("evaluation", ("conddetr_jax.evaluation",)),
  ("training", ("conddetr_jax.training",)),
  # eval.py's library writes the training run's metrics files.
  (
    "running a trained model",
    (
      "conddetr_jax.evaluation.checkpoint_eval",
      "conddetr_jax.inference",
      "conddetr_jax.aot",
      "conddetr_jax.export",
    ),
  ),
  # The package's root re-exports the Python API (imported on first use).
  ("the Python API", ("conddetr_jax",)),
  # The commands: the scripts (linked into the package), their launchers, and the commands run as
  # python -m conddetr_jax.<name> (their libraries live in checkpoints/ and data/).
  (
    "entry points",
    ENTRY_POINTS
    + (
      "conddetr_jax.commands",
      "conddetr_jax.convert",
      "conddetr_jax.find_images",
      "conddetr_jax.inspect_batches",
    ),
  ),
)


# The only modules that may import TensorFlow (a name covers everything inside it): the input
# pipeline, and the SavedModel export, which is TensorFlow by definition. Everything else (models,
# training, evaluation, the other exports) must run without loading it. cli.load_tensorflow loads
# it by name, on request of the commands that read data.
TENSORFLOW_USERS = ("conddetr_jax.data", "conddetr_jax.export.saved_model")


def module_files(repo: str = REPO) -> dict[str, str]:
  """Dotted module name -> file, for the package's modules and the entry-point scripts."""
  files = {name: os.path.join(repo, f"{name}.py") for name in ENTRY_POINTS}
  for folder, _, names in os.walk(
    os.path.join(repo, PACKAGE), followlinks=True
  ):  # configs/ is linked in
    for name in names:
      if name.endswith(".py"):
        parts = os.path.relpath(os.path.join(folder, name), repo)[: -len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts.pop()
        files[".".join(parts)] = os.path.join(folder, name)
  return files


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
  """The modules of ``known`` that ``source`` (the text of ``module``) imports, at any depth.

  ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``; relative
  imports are resolved against ``module``.
  """
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
      ]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `import a.b.c` where only a.b is ours, say
        target = target.rpartition(".")[0]
      if target and target != module:
        found.add(target)
  return found


def import_graph(repo: str = REPO) -> dict[str, set[str]]:
  """Module -> the package modules it imports."""
  files = module_files(repo)
  known = set(files)
  graph = {}
  for module, path in files.items():
    with open(path, encoding="utf-8") as f:
      graph[module] = imported_modules(f.read(), module, path.endswith("__init__.py"), known)
  return graph


def imports_tensorflow(source: str) -> bool:
  """Whether ``source`` imports ``tensorflow`` or a module inside it, at any depth."""
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module or ""]
    else:
      continue
    if any(n == "tensorflow" or n.startswith("tensorflow.") for n in names):
      return True
  return False


def floor_of(module: str) -> int | None:
  """Index of ``module``'s floor in ``FLOORS`` (the longest matching name wins), or None."""
  best, best_len = None, -1
  for index, (_, names) in enumerate(FLOORS):
    for name in names:
      # The package's own name covers only its __init__, so a new module is not placed by default.
      covers = module == name or (name != PACKAGE and module.startswith(name + "."))
      if covers and len(name) > best_len:
        best, best_len = index, len(name)
  return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle (``[a, b, ..., a]``) of ``graph``, or None."""
  state = {}  # module -> "open" while on the path, "done" once fully explored
  path = []

  def visit(module: str) -> list[str] | None:
    state[module] = "open"
    path.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        return path[path.index(target) :] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """'a (floor) -> b (higher floor)' for every import that runs up a floor."""
  found = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      low, high = floor_of(module), floor_of(target)
      if low is not None and high is not None and high > low:
        found.append(f"{module} ({FLOORS[low][0]}) -> {target} ({FLOORS[high][0]})")
  return found


# ------------------------------------------------------------------------------ the checker itself


def test_the_reader_sees_function_level_relative_and_submodule_imports():
  known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
  source = (
    "import os\n"
    "from pkg import a\n"
    "def f():\n"
    "  from pkg.sub import c, helper\n"
    "  import pkg.b.thing\n"
    "class K:\n"
    "  def g(self):\n"
    "    from .. import b\n"
  )
  assert imported_modules(source, "pkg.sub.x", False, known) == {
    "pkg.a",
    "pkg.sub.c",
    "pkg.sub",
    "pkg.b",
  }
  assert imported_modules("from . import c\n", "pkg.sub", True, known) == {"pkg.sub.c"}


def test_the_checks_catch_a_circle_and_an_upward_import():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
  assert upward_imports(
    {"conddetr_jax.evaluation.coco_eval": {"conddetr_jax.training.parallel", "conddetr_jax.data"}}
  ) == [
    "conddetr_jax.evaluation.coco_eval (evaluation) -> conddetr_jax.training.parallel (training)"
  ]


def test_the_graph_is_the_package_s():
  graph = import_graph()
  assert "conddetr_jax.training.loop" in graph and "predict" in graph
  assert "conddetr_jax.evaluation.coco_eval" in graph["conddetr_jax.training.loop"]
  assert (
    "conddetr_jax.models" in graph["conddetr_jax.checkpoints.convert"]
  )  # imported inside a function


# ------------------------------------------------------------------------------ the house


@pytest.fixture(name="graph", scope="module")
def fixture_graph() -> dict[str, set[str]]:
  return import_graph()


def test_every_module_is_on_a_floor(graph):
  unplaced = sorted(m for m in graph if floor_of(m) is None)
  assert not unplaced, f"add these modules to FLOORS in {__file__}: {unplaced}"


def test_no_import_circle(graph):
  cycle = find_cycle(graph)
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_runs_up_a_floor(graph):
  upward = upward_imports(graph)
  assert not upward, "imports from a lower floor to a higher one:\n  " + "\n  ".join(upward)


def test_the_tensorflow_reader_sees_plain_from_and_function_level_imports():
  assert imports_tensorflow("import tensorflow as tf\n")
  assert imports_tensorflow("def f():\n  from tensorflow.python import ops\n")
  assert not imports_tensorflow("import tensorflow_datasets\nfrom . import tensorflow\n")


def test_only_the_data_pipeline_and_the_saved_model_import_tensorflow():
  files = module_files()
  users = []
  for module, path in sorted(files.items()):
    with open(path, encoding="utf-8") as f:
      if imports_tensorflow(f.read()):
        users.append(module)
  allowed = lambda m: any(m == n or m.startswith(n + ".") for n in TENSORFLOW_USERS)
  assert "conddetr_jax.export.saved_model" in users
  assert [m for m in users if not allowed(m)] == [], f"only {TENSORFLOW_USERS} may import it"


@pytest.mark.parametrize("floor", range(len(FLOORS)))
def test_every_floor_names_existing_modules(graph, floor):
  missing = [
    n for n in FLOORS[floor][1] if not any(floor_of(m) == floor and m.startswith(n) for m in graph)
  ]
  assert not missing, f"floor {FLOORS[floor][0]!r} names modules that do not exist: {missing}"
