"""Text (or text-pair) classification rows -> token ids and label ids, with loud row-level checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import datasets
import numpy as np

from jaxtune.config import DataConfig
from jaxtune.data import cache, origin, splits
from jaxtune.data.rows import TokenRows
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Encoded(TokenRows):
  """One tokenised split; row i is input_ids[i] (ragged, <= max_len) with label labels[i]."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: np.ndarray  # int32 ids into the label list saved with the checkpoint
  ROW_FIELDS: ClassVar[tuple[str, ...]] = ("input_ids", "token_type_ids", "labels")  # hostrows.Rows reads these


def check_columns(ds: datasets.Dataset, cfg: DataConfig, name: str) -> None:
  if len(ds) == 0:
    raise UserError(f"data split {name} has no rows; point it at a non-empty file.")
  for column in (cfg.text_column, cfg.text_pair_column, cfg.label_column):
    if column is not None and column not in ds.column_names:
      raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); set "
                      "data.text_column / data.text_pair_column / data.label_column to existing columns.")


def label_list(ds: datasets.Dataset, cfg: DataConfig, name: str) -> list[Any]:
  """The sorted distinct labels of the training split; their positions are the class ids."""
  check_columns(ds, cfg, name)
  values = ds[cfg.label_column][:]  # a list: iterating datasets' lazy Column reads one row at a time
  missing = [i for i, v in enumerate(values) if v is None]
  if missing:
    raise UserError(f"data split {origin.at(name, missing[0])} has no {cfg.label_column!r}; fill or drop it.")
  labels = sorted(set(values))
  if len(labels) < 2:
    raise UserError(f"data split {name} column {cfg.label_column!r} has {len(labels)} distinct label(s); "
                    "classification needs at least 2.")
  return labels


def encode(ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any, labels: Sequence[Any], name: str) -> Encoded:
  """Tokenises a split (truncating to max_len) and maps its labels to ids."""
  check_columns(ds, cfg, name)
  texts = _texts(ds, cfg.text_column, name)
  pairs = _texts(ds, cfg.text_pair_column, name) if cfg.text_pair_column else None
  ids = {label: i for i, label in enumerate(labels)}
  label_ids = np.empty(len(ds), np.int32)
  for row, value in enumerate(ds[cfg.label_column][:]):
    if value not in ids:
      raise UserError(f"data split {origin.at(name, row)} has label {value!r}, which the training split does not "
                      f"have (labels: {list(labels)}); fix the row or the label column.")
    label_ids[row] = ids[value]
  enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_len, return_token_type_ids=True)
  as_arrays = lambda rows: [np.asarray(r, np.int32) for r in rows]
  return Encoded(as_arrays(enc["input_ids"]), as_arrays(enc["token_type_ids"]), label_ids)


def _texts(ds: datasets.Dataset, column: str, name: str) -> list[str]:
  texts = ds[column][:]
  for row, text in enumerate(texts):
    if not isinstance(text, str) or not text.strip():
      raise UserError(f"data split {origin.at(name, row)} has an empty or non-text {column!r} ({text!r}); "
                      "fill or drop that row.")
  return list(texts)


def load_splits(cfg: DataConfig, seed: int, tokenizer: Any, names: Sequence[str],
                labels: Sequence[Any] | None = None, extra: dict[str, str] | None = None,
                limit: int | None = None, per_host: bool = False) -> tuple[list[Any], dict[str, Encoded]]:
  """(labels, encoded splits) for `names`; labels come from the training split unless given. With `per_host`
  the train split is a hostrows.Rows, tokenised later only where a process asks. With data.cache_dir each split
  is read from its cache entry (data/cache.py), built on a miss; a multi-process run reads its train rows from
  an entry but never builds one (that would tokenise every row in one process)."""
  named = splits.load_rows(cfg, seed, names, extra, limit)  # split -> (its name for row errors, its rows)
  raw = {n: ds for n, (_, ds) in named.items()}
  if labels is None:  # from every training row, even when `limit` cut the splits being encoded
    train_name, train = (named if "train" in names and not limit else splits.load_rows(cfg, seed, ["train"]))["train"]
    labels = label_list(train, cfg, train_name)

  parts = {"task": "classification", "tokenizer": cache.tokenizer_digest(tokenizer), "data": cache.data_fields(cfg),
           "labels": [repr(label) for label in labels],
           "code": cache.code_digest(__name__, "jaxtune.data.rows")} if cfg.cache_dir else {}

  def encoded(n: str) -> Any:
    name = named[n][0]
    check_columns(raw[n], cfg, name)
    return cache.load(cfg.cache_dir, parts, raw[n], lambda ds: encode(ds, cfg, tokenizer, labels, name), name,
                      per_host and n == "train")

  return list(labels), {n: encoded(n) for n in names}
