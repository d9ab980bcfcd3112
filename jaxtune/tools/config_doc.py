"""docs/configuration.md, generated from the config dataclasses (config/sections.py): every key with its type, its
allowed range, its default and the comment that the code gives it. `jaxtune config-docs --output
docs/configuration.md` writes it; tests/test_config_doc.py fails when the page and the code disagree."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from jaxtune.config import declared, sections

HEADER = """# Configuration reference

Generated from `jaxtune/config/sections.py` by `jaxtune config-docs --output docs/configuration.md`
(`tests/test_config_doc.py` fails when this page and the code disagree). A config is a YAML file with one
mapping per section; any key can also be set on the command line as a dotted override (`optim.lr=3e-5`).
A value outside its range, an unknown key or a wrong type is refused with one line naming the key.
"""


def _comments(lines: list[str], node: ast.AnnAssign) -> str:
  """The comment block right above a field and the comment at the end of its line, joined."""
  above = []
  i = node.lineno - 2  # the line before the field (0-based)
  while i >= 0 and lines[i].strip().startswith("#"):
    above.insert(0, lines[i].strip().lstrip("#").strip())
    i -= 1
  last = lines[node.end_lineno - 1]
  tail = ""
  if "  # " in last:
    tail = last.split("  # ", 1)[1].strip()
  return " ".join(part for part in (*above, tail) if part)


def _cell(text: str) -> str:
  return " ".join(text.replace("|", "\\|").split())  # one line, an annotation's wrapped lines joined


def section_docs(cls: type) -> list[tuple[str, str, str, str]]:
  """(key, type and range, default, meaning) for each field of one section class, in source order."""
  source = inspect.getsource(cls)
  tree = ast.parse(source)
  lines = source.splitlines()
  bounds = declared(cls)
  defaults = {f.name: f for f in dataclasses.fields(cls)}
  rows = []
  for node in tree.body[0].body:
    if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
      continue
    name = node.target.id
    kind = ast.get_source_segment(source, node.annotation)
    if name in bounds:
      kind += f" ({bounds[name].text().removeprefix('must be ')})"
    field = defaults[name]
    if dataclasses.is_dataclass(field.default):
      default = f"see `{field.default.SECTION}`"
    elif field.default_factory is not dataclasses.MISSING:
      default = f"`{field.default_factory()!r}`"
    elif field.default is dataclasses.MISSING:
      default = "required"
    else:
      default = f"`{field.default!r}`"
    rows.append((name, kind, default, _comments(lines, node)))
  return rows


def _doc(cls: type) -> str:
  doc = inspect.getdoc(cls) or ""
  return doc if not doc.startswith(f"{cls.__name__}(") else ""  # dataclasses' generated signature is no doc


def markdown() -> str:
  """The whole page."""
  classes = [sections.Config, sections.ModelConfig, sections.LoraConfig, sections.DataConfig, sections.OptimConfig,
             sections.TrainConfig, sections.CheckpointConfig, sections.MeshConfig, sections.GenerateConfig,
             sections.QAConfig, sections.PreferenceConfig]
  out = [HEADER]
  for cls in classes:
    key = cls.SECTION
    out.append(f"## {'`' + key + '`' if key else 'Top level'}\n")
    if doc := _doc(cls):
      out.append(doc + "\n")
    out.append("| key | type (range) | default | meaning |")
    out.append("|---|---|---|---|")
    for name, kind, default, meaning in section_docs(cls):
      full = f"{key}.{name}" if key else name
      out.append(f"| `{full}` | {_cell(kind)} | {_cell(default)} | {_cell(meaning)} |")
    out.append("")
  return "\n".join(out)


