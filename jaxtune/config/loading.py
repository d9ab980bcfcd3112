"""Loading a run configuration: YAML plus dotted `key=value` overrides, every value type-checked."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxtune import storage
from jaxtune.config.sections import Config
from jaxtune.errors import UserError

PACKAGED = Path(__file__).resolve().parents[1] / "configs"  # the example configs shipped in the package


def resolve_path(path: str | Path) -> Path:
  """`path` when it is a file; else a bare name (`minilm_reviews`, `minilm_reviews.yaml`) of a shipped config."""
  path = Path(path)
  if path.is_file() or path.parent != Path("."):
    return path
  packaged = PACKAGED / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
  return packaged if packaged.is_file() else path


def shipped() -> list[str]:
  """The names of the configs shipped in the package."""
  return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
  """Reads a YAML config (a file, or the name of a shipped one), applies dotted `key=value` overrides and
  type-checks every field."""
  path = storage.path(path) if storage.is_remote(path) else resolve_path(path)  # a run's config may be remote
  if not path.is_file():
    raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config, or the name of a "
                    f"shipped config ({', '.join(shipped())}).")
  try:
    raw = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or type(e).__name__
    raise UserError(f"config file {path} is not valid YAML ({problem}{where}); fix the syntax.") from None
  if not isinstance(raw, dict):
    raise UserError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}.")
  for item in overrides:
    apply_override(raw, item)
  return from_dict(Config, raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
  """Sets `a.b.c=value` in a raw config dict; the value is parsed as YAML and typed later."""
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise UserError(f"override {item!r} is not of the form section.key=value.")
  *parents, leaf = key.split(".")
  node, cls = raw, Config
  for i, name in enumerate([*parents, leaf]):
    if dataclasses.is_dataclass(cls):  # below a mapping field (mesh.rules.<axis>) any key goes
      fields = {f.name: f for f in dataclasses.fields(cls)}
      if name not in fields:
        where = ".".join(parents[:i]) or "the top level"
        raise UserError(f"override {key!r}: no key {name!r} at {where}; expected one of {sorted(fields)}.")
    if i == len(parents):
      node[leaf] = yaml.safe_load(text) if text else ""
    else:
      cls = typing.get_type_hints(cls)[name] if dataclasses.is_dataclass(cls) else None
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise UserError(f"override {key!r}: {name} is not a section.")


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
  """Builds dataclass `cls` from `raw`, rejecting unknown keys and values of the wrong type."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - set(fields))
  if unknown:
    raise UserError(f"unknown config key {prefix}{unknown[0]}; expected one of {sorted(fields)}.")
  kwargs = {}
  for name, f in fields.items():
    key = prefix + name
    if name in raw:
      kwargs[name] = _convert(raw[name], hints[name], key)
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
      raise UserError(f"config key {key} is required; add it to the config file.")
  return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
  """Plain nested dict of a config (tuples as lists), safe for YAML/JSON."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _convert(value: Any, hint: Any, key: str) -> Any:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if dataclasses.is_dataclass(hint):
    if not isinstance(value, dict):
      raise UserError(f"config key {key} must be a section (mapping), got {value!r}.")
    return from_dict(hint, value, key + ".")
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    (inner,) = [a for a in args if a is not type(None)]
    return _convert(value, inner, key)
  if origin is Literal:
    if value not in args:
      raise UserError(f"config key {key} is {value!r}; expected one of {list(args)}.")
    return value
  if origin is dict:
    if not isinstance(value, dict):
      raise UserError(f"config key {key} must be a mapping, got {value!r}.")
    return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
  if origin is tuple:
    if isinstance(value, (str, int, float)):
      value = [value]
    if not isinstance(value, (list, tuple)):
      raise UserError(f"config key {key} must be a list, got {value!r}.")
    return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    try:  # YAML 1.1 reads "3e-5" (no dot) as a string.
      return float(value)
    except ValueError:
      pass
  if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
    raise UserError(f"config key {key} must be {hint.__name__}, got {value!r}.")
  return value
