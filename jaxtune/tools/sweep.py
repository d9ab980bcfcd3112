"""Grid sweeps: every combination of the given config values, one finetune.py process per variant, into sibling
run dirs; finished variants are skipped and interrupted ones resumed, so rerunning the command continues."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxtune import cli
from jaxtune import config as config_lib
from jaxtune.errors import UserError
from jaxtune.tools import compare


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
  """`section.key=[v1, v2]` (a YAML list; a single value is a list of one) -> (key, values)."""
  grid = []
  for item in items:
    key, sep, text = item.partition("=")
    try:
      values = yaml.safe_load(text) if sep else None
    except yaml.YAMLError:
      values = None
    if not sep or not key or values is None or values == []:
      raise UserError(f"--grid {item!r} is not of the form section.key=[value, ...], e.g. 'optim.lr=[1e-4,5e-5]'.")
    grid.append((key, [_number(v) for v in (values if isinstance(values, list) else [values])]))
  if len({k for k, _ in grid}) != len(grid):
    raise UserError("--grid names a key twice; give each key once with all its values.")
  return grid


def _number(value: Any) -> Any:
  """YAML 1.1 reads 1e-4 (no dot) as a string; such a value is the number it spells."""
  if isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      return value
  return value


def variants(grid: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
  keys = [k for k, _ in grid]
  return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in grid))]


def overrides_of(variant: dict[str, Any]) -> list[str]:
  return [f"{k}={json.dumps(v)}" for k, v in variant.items()]  # JSON is YAML, and typed like the field later


def name_of(variant: dict[str, Any]) -> str:
  """A run dir name: each key's last part and its value, e.g. lr=0.0001__seed=1."""
  parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in variant.items()]
  return "__".join(parts).replace("/", "_").replace(" ", "") or "default"


def run(config: Path, grid: Sequence[tuple[str, list[Any]]], out: Path, overrides: Sequence[str] = (),
        log: Callable[[str], None] = print) -> str:
  """Trains every variant not finished yet, then returns (and writes to out/compare.md) the compare table."""
  todo = variants(grid)
  for variant in todo:  # every variant's config is checked before the first run starts
    config_lib.load(config, [*overrides, *overrides_of(variant)])
  names = [name_of(v) for v in todo]
  if len(set(names)) != len(names):
    raise UserError("two variants of the grid get the same run dir name; give the values distinct text.")
  out.mkdir(parents=True, exist_ok=True)
  for variant, name in zip(todo, names):
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
      log(f"== {name}: finished, skipped")
      continue
    resume = ["--resume"] if (run_dir / "config.yaml").is_file() else []  # an interrupted variant continues
    log(f"== {name}" + (" (resumed)" if resume else ""))
    cmd = [*cli.command("finetune"), "--config", str(config), "--run-dir", str(run_dir), *resume,
           *overrides, *overrides_of(variant)]
    if (code := subprocess.run(cmd).returncode) != 0:
      raise UserError(f"variant {name} failed (exit {code}); its output is above. Fix it and rerun the sweep: "
                      "finished variants are kept.")
  table = compare.markdown([compare.read_run(out / name) for name in names])
  (out / "compare.md").write_text(table)
  return table
