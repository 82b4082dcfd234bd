"""The README and docs/ as a user reads them: short enough to read, and every link leads
somewhere."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
  os.path.join("docs", name)
  for name in os.listdir(os.path.join(REPO, "docs"))
  if name.endswith(".md")
)
README_MAX_BYTES = (
  15_000  # as `wc -c` counts: a manual read in five minutes; measurements belong in docs/
)

DOC_MAX_BYTES = 150_000  # twice the longest document (docs/accelerators.md's tables and history)

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)
_ANCHOR = re.compile(r'<a id="([^"]+)">')


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  with open(path, encoding="utf-8") as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
  return {_slug(h) for h in _HEADING.findall(text)} | set(_ANCHOR.findall(text))


def test_readme_is_a_short_manual():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  size = len(text.encode("utf-8"))
  assert size <= README_MAX_BYTES, f"README.md has {size} bytes (at most {README_MAX_BYTES})"


@pytest.mark.parametrize("document", DOCS)
def test_no_document_has_grown_past_a_reader(document):
  # 472c5fe wrote a paragraph between every character of docs/accelerators.md (54 MB): an edit
  # script's str.replace with an empty pattern. Nothing else checks a document's size.
  size = os.path.getsize(os.path.join(REPO, document))
  assert size <= DOC_MAX_BYTES, f"{document} has {size} bytes (at most {DOC_MAX_BYTES})"


@pytest.mark.parametrize("document", ["README.md"] + DOCS)
def test_every_relative_link_and_anchor_resolves(document):
  path = os.path.join(REPO, document)
  with open(path, encoding="utf-8") as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
  broken = []
  for target in _LINK.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
      continue
    file_part, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(linked):
      broken.append(f"{target}: no file {os.path.relpath(linked, REPO)}")
    elif anchor and linked.endswith(".md") and anchor not in _anchors(linked):
      broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(linked, REPO)}")
  assert not broken, f"{document}: " + "; ".join(broken)


def test_docs_index_names_every_document():
  with open(os.path.join(REPO, "docs", "README.md"), encoding="utf-8") as f:
    index = f.read()
  missing = [
    d
    for d in DOCS
    if d != os.path.join("docs", "README.md") and f"]({os.path.basename(d)})" not in index
  ]
  assert not missing, f"docs/README.md does not name {missing}"


_JAX_EXTRA = re.compile(r"jax\[(\w+)\]([^\s\"'`)]*)")  # jax[tpu]==0.10.2 -> ("tpu", "==0.10.2")
_INSTALL_DOCUMENTS = (
  ["README.md"] + DOCS + sorted(n for n in os.listdir(REPO) if n.startswith("requirements"))
)


def _jax_installs(document: str) -> list[tuple[str, str]]:
  """(extra, version suffix) of every ``jax[extra]`` on a line of ``document`` that runs pip
  install."""
  with open(os.path.join(REPO, document), encoding="utf-8") as f:
    return [m for line in f if "pip install" in line for m in _JAX_EXTRA.findall(line)]


def test_every_accelerator_install_line_pins_one_jax_of_the_required_range():
  from packaging import requirements  # pylint: disable=import-outside-toplevel

  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    [jax] = [requirements.Requirement(line) for line in f if re.match(r"jax\W", line)]
  assert {extra for extra, _ in _jax_installs("README.md")} >= {
    "cuda12",
    "tpu",
  }  # one line per platform
  pins = {}
  for document in _INSTALL_DOCUMENTS:
    for extra, suffix in _jax_installs(document):
      if suffix.startswith("==<"):  # a placeholder that names the installed jax ("==<your jax>")
        continue
      assert suffix.startswith("==") and suffix[2:], (
        f"{document}: jax[{extra}]{suffix} is not pinned"
      )
      pins.setdefault(extra, set()).add(suffix[2:])
  assert all(len(versions) == 1 for versions in pins.values()), (
    f"one release per platform, not {pins}"
  )
  outside = {extra: v for extra, [v] in pins.items() if v not in jax.specifier}
  assert not outside, f"{outside} is outside requirements.txt's {jax}"
