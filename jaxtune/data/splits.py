"""Named splits of a run (train / validation / test / any file) as raw `datasets.Dataset`s."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

from jaxtune.config import DataConfig
from jaxtune.data import origin
from jaxtune.data.sources import load_split
from jaxtune.errors import UserError


def specs(cfg: DataConfig, extra: dict[str, str] | None = None) -> dict[str, str | None]:
  return {"train": cfg.train, "validation": cfg.validation, "test": cfg.test, **(extra or {})}


def describe(cfg: DataConfig, name: str, extra: dict[str, str] | None = None) -> str:
  """`name (spec)` for error messages; a held-out validation split names its source."""
  return f"{name} ({specs(cfg, extra).get(name) or cfg.train})"


def load_rows(cfg: DataConfig, seed: int, names: Sequence[str], extra: dict[str, str] | None = None,
              limit: int | None = None) -> dict[str, tuple[str, datasets.Dataset]]:
  """split -> (its `describe` name, which knows where each of its rows came from (`origin.at`), its rows): the
  first `limit` rows of each if given; a validation_holdout is a seeded subset of train."""
  spec = specs(cfg, extra)
  raw: dict[str, tuple[datasets.Dataset, origin.Origin]] = {}
  if "train" in names or ("validation" in names and cfg.validation_holdout):
    train = load_split(cfg.train, cfg.text_unit)
    raw["train"] = train, origin.Origin.of(cfg.train, cfg.text_unit, len(train))
    if cfg.validation_holdout:
      if cfg.validation_holdout >= len(train):
        raise UserError(f"data.validation_holdout={cfg.validation_holdout} leaves no training rows out of "
                        f"{len(train)}; lower it.")
      order = np.random.default_rng(seed).permutation(len(train))
      parts = {"validation": np.sort(order[:cfg.validation_holdout]), "train": np.sort(order[cfg.validation_holdout:])}
      raw.update({n: (train.select(rows), raw["train"][1].take(rows)) for n, rows in parts.items()})
  for name in names:
    if name not in raw:
      if spec.get(name) is None:
        raise UserError(f"split {name!r} is not configured; set data.{name} in the config or pass --data FILE.")
      ds = load_split(spec[name], cfg.text_unit)
      raw[name] = ds, origin.Origin.of(spec[name], cfg.text_unit, len(ds))
  out = {}
  for n in names:
    ds, where = raw[n]
    if limit:
      rows = range(min(limit, len(ds)))
      ds, where = ds.select(rows), where.take(rows)
    out[n] = origin.named(describe(cfg, n, extra), where), ds
  return out


def load_raw(cfg: DataConfig, seed: int, names: Sequence[str], extra: dict[str, str] | None = None,
             limit: int | None = None) -> dict[str, datasets.Dataset]:
  """Rows of each named split, as `load_rows`."""
  return {n: ds for n, (_, ds) in load_rows(cfg, seed, names, extra, limit).items()}


def load_named(cfg: DataConfig, seed: int, names: Sequence[str], extra: dict[str, str] | None = None,
               limit: int | None = None) -> dict[str, tuple[str, datasets.Dataset]]:
  """`load_rows`, where a split without rows is a UserError."""
  out = load_rows(cfg, seed, names, extra, limit)
  for name, ds in out.values():
    if len(ds) == 0:
      raise UserError(f"data split {name} has no rows; point it at a non-empty file.")
  return out
