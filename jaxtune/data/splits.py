"""Named splits of a run (train / validation / test / any file) as raw `datasets.Dataset`s."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from jaxtune.config import DataConfig
from jaxtune.data.sources import load_split
from jaxtune.errors import UserError


def specs(cfg: DataConfig, extra: dict[str, str] | None = None) -> dict[str, str | None]:
  return {"train": cfg.train, "validation": cfg.validation, "test": cfg.test, **(extra or {})}


def describe(cfg: DataConfig, name: str, extra: dict[str, str] | None = None) -> str:
  """`name (spec)` for error messages; a held-out validation split names its source."""
  return f"{name} ({specs(cfg, extra).get(name) or cfg.train})"


def load_raw(cfg: DataConfig, seed: int, names: Sequence[str], extra: dict[str, str] | None = None,
             limit: int | None = None) -> dict[str, datasets.Dataset]:
  """Rows of each named split (the first `limit` of each if given); a validation_holdout is a seeded subset of train."""
  spec = specs(cfg, extra)
  raw: dict[str, datasets.Dataset] = {}
  if "train" in names or ("validation" in names and cfg.validation_holdout):
    raw["train"] = load_split(cfg.train, cfg.text_unit)
    if cfg.validation_holdout:
      if cfg.validation_holdout >= len(raw["train"]):
        raise UserError(f"data.validation_holdout={cfg.validation_holdout} leaves no training rows out of "
                        f"{len(raw['train'])}; lower it.")
      order = np.random.default_rng(seed).permutation(len(raw["train"]))
      raw["validation"] = raw["train"].select(np.sort(order[:cfg.validation_holdout]))
      raw["train"] = raw["train"].select(np.sort(order[cfg.validation_holdout:]))
  for name in names:
    if name not in raw:
      if spec.get(name) is None:
        raise UserError(f"split {name!r} is not configured; set data.{name} in the config or pass --data FILE.")
      raw[name] = load_split(spec[name], cfg.text_unit)
  return {n: raw[n].select(range(min(limit, len(raw[n])))) if limit else raw[n] for n in names}


def load_named(cfg: DataConfig, seed: int, names: Sequence[str], extra: dict[str, str] | None = None,
               limit: int | None = None) -> dict[str, tuple[str, datasets.Dataset]]:
  """split -> (its `describe` name for messages, its rows), as `load_raw`; a split without rows is a UserError."""
  out = {}
  for n, ds in load_raw(cfg, seed, names, extra, limit).items():
    name = describe(cfg, n, extra)
    if len(ds) == 0:
      raise UserError(f"data split {name} has no rows; point it at a non-empty file.")
    out[n] = name, ds
  return out
