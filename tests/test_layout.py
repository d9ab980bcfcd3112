"""The layout docs/architecture.md draws: every import of jaxtune's own modules points down the layers, never up
or sideways into another room of the same layer, and no module outgrows the size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxtune"
# Bottom to top; a room may import its own modules and any room of a lower layer.
LAYERS = [{"errors", "params"}, {"storage", "coordinator"}, {"config", "distributed"}, {"cli"}, {"sharding", "data"},
          {"models"},
          {"weights"}, {"generation"}, {"tasks"}, {"train"}, {"eval", "tools"}, {"commands", "api"}, {"__main__"}]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
MAX_LINES = 400


def room(module: str) -> str:
  """`jaxtune.train.loop` -> `train`; `jaxtune.params` -> `params`."""
  return module.split(".")[1]


def imports(path: Path) -> set[str]:
  """The jaxtune modules a file imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxtune"):
      found |= {f"{node.module}.{a.name}" if node.module == "jaxtune" else node.module for a in node.names}
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("jaxtune.")}
  return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_room_has_a_layer():
  rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in FILES}
  assert rooms == set(LAYER), rooms ^ set(LAYER)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
  own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
  for module in imports(path):
    other = room(module)
    assert other == own or LAYER[other] < LAYER[own], (
        f"{path.relative_to(PACKAGE)} ({own}, layer {LAYER[own]}) imports {module} ({other}, layer {LAYER[other]})")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable(path):
  assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines: split it by job"


def test_the_checker_sees_a_bad_import(tmp_path):
  """The parser finds imports inside functions too, where an upward one would hide."""
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from jaxtune.train import loop\n  import jaxtune.eval.evaluate\n")
  assert imports(bad) == {"jaxtune.train", "jaxtune.eval.evaluate"}
  assert LAYER[room("jaxtune.train")] > LAYER[room("jaxtune.models.layers")]
