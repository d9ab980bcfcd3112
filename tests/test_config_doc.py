"""docs/configuration.md is the config dataclasses written out (jaxtune/tools/config_doc.py): the page equals what
the code generates now, names every key, and gives each key a meaning."""

from __future__ import annotations

import dataclasses

from conftest import REPO

from jaxtune.config import sections
from jaxtune.tools import config_doc

PAGE = REPO / "docs" / "configuration.md"


def test_the_page_is_what_the_code_generates():
  assert PAGE.read_text() == config_doc.markdown(), (
      "docs/configuration.md is out of date: python scripts/config_docs.py --output docs/configuration.md")


def test_every_key_is_listed_with_a_meaning():
  classes = [c for c in vars(sections).values() if isinstance(c, type) and hasattr(c, "SECTION")]
  keys = {f"{c.SECTION}.{f.name}".lstrip(".") for c in classes for f in dataclasses.fields(c)}
  rows = {line.split("`")[1]: line for line in PAGE.read_text().splitlines() if line.startswith("| `")}
  assert set(rows) == keys
  undocumented = [key for key, line in rows.items() if line.rstrip().endswith("|  |")]
  assert not undocumented, f"config keys without a comment in jaxtune/config/sections.py: {undocumented}"
  assert "| `train.early_stopping_patience` | NonNegative (>= 0) | `0` | Stop once this many" in PAGE.read_text()
