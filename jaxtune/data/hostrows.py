"""A train split tokenised only where asked: what one process of a multi-process run holds of it.

With several processes (jax.distributed) each builds only its block of every global batch
(`batching.local_rows`), so it needs the token ids of only those rows. `Rows` keeps the raw split (read,
not tokenised) and tokenises rows on `fetch`; `exchange` then gives every process the lengths of every
row any process tokenised, and the largest token id: all that a batch's padded length, the logged token
counts and the length-grouped order need of the rows that other processes hold. Each row is one example
(the tasks whose rows depend on the whole split, QA windows and packed text, encode it whole), so the
row count, and with it the batch order, is known before anything is tokenised. `feed.HostFeed` decides
which rows a process fetches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxtune.errors import UserError


class Rows:
  """`num_rows` rows; `encode(rows)` gives the task's encoded rows (classification.Encoded, ...) of split rows
  `rows`, in that order, and `whole()` the whole split's (called only to raise a bad row's error exactly as a
  one-process run does, numbered within the split). `stats` name the per-row lengths that collate reads of
  every row of a batch (`lengths`; seq2seq adds `target_lengths`).

  Read like the encoded split by the train feed and collate: `len`, the stats (0 for rows no process has
  tokenised), `max_token_id`, and each per-row field (`ROW_FIELDS` of the encoded class) as a `Column`
  indexed by split row, for the rows tokenised here.
  """

  def __init__(self, num_rows: int, encode: Callable[[np.ndarray], Any], whole: Callable[[], Any],
               stats: Sequence[str] = ("lengths",)):
    self.num_rows, self.encode, self.whole = num_rows, encode, whole
    self.stats = {key: np.zeros(num_rows, np.int32) for key in stats}
    self.chunks: list[Any] = []  # the encoded rows of each fetch
    self.chunk_of = np.full(num_rows, -1, np.int32)  # split row -> its chunk (-1: not tokenised here)
    self.index = np.zeros(num_rows, np.int64)  # split row -> its row in that chunk
    self.max_token_id = 0
    self.count = 0  # rows tokenised by this process
    self.tokenized = [0]  # by each process, as of the latest `exchange`
    self.error: UserError | None = None

  @classmethod
  def of_dataset(cls, ds: Any, encode: Callable[[Any], Any], stats: Sequence[str] = ("lengths",)) -> Rows:
    """Rows of a datasets.Dataset, `encode(dataset)` encoding the selected rows."""
    return cls(len(ds), lambda rows: encode(ds.select(rows)), lambda: encode(ds), stats)

  def __len__(self) -> int:
    return self.num_rows

  def __getattr__(self, name: str) -> Any:
    state = self.__dict__
    if name in state.get("stats", {}):
      return state["stats"][name]
    chunks = state.get("chunks")
    if not chunks:
      raise AttributeError(name)
    if name in getattr(type(chunks[0]), "ROW_FIELDS", ()):
      return Column(self, name)
    return getattr(chunks[0], name)  # the same for every chunk (LMExamples.seq_len)

  def fetch(self, rows: np.ndarray) -> None:
    """Tokenises those of `rows` not tokenised yet. A bad row's error waits for `exchange` (which every process
    reaches), so that every process stops on it rather than some waiting for the others."""
    new = np.unique(np.asarray(rows, np.int64))
    new = new[self.chunk_of[new] < 0]
    if not len(new) or self.error is not None:
      return
    try:
      chunk = self.encode(new)
    except UserError as e:
      self.error = e
      return
    self.chunk_of[new], self.index[new] = len(self.chunks), np.arange(len(new))
    self.chunks.append(chunk)
    for key, values in self.stats.items():
      values[new] = getattr(chunk, key)
    self.max_token_id = max(self.max_token_id, chunk.max_token_id)
    self.count += len(new)

  def exchange(self) -> None:
    """Every process's stats, largest token id and row count, merged into each (a collective: every process calls
    it at the same point); any process's row error is raised on every process."""
    mine = np.concatenate([[int(self.error is not None), self.max_token_id, self.count], *self.stats.values()])
    mine = mine.astype(np.int32)
    self.merge(multihost_utils.process_allgather(mine) if jax.process_count() > 1 else mine[None])

  def merge(self, everyone: np.ndarray) -> None:
    """`exchange`'s merge of every process's (error flag, max token id, count, stats...) row."""
    if everyone[:, 0].any():
      self.whole()  # raises the bad row's error, the same on every process
      raise self.error or UserError("another process could not encode its rows of the train split; see its error.")
    self.max_token_id, self.tokenized = int(everyone[:, 1].max()), everyone[:, 2].tolist()
    for i, key in enumerate(self.stats):
      self.stats[key] = everyone[:, 3 + i * self.num_rows:3 + (i + 1) * self.num_rows].max(axis=0)


class Column:
  """One per-row field of `Rows`, indexed by split row: a row, an index array, or (index array, more indices)."""

  def __init__(self, rows: Rows, name: str):
    self.rows, self.name = rows, name

  @property
  def dtype(self) -> np.dtype:  # of an array field (LMExamples')
    return getattr(self.rows.chunks[0], self.name).dtype

  def _row(self, r: int) -> Any:
    chunk = self.rows.chunk_of[r]
    if chunk < 0:
      raise IndexError(f"train row {r} was not tokenised by this process (its devices do not hold it)")
    return getattr(self.rows.chunks[chunk], self.name)[self.rows.index[r]]

  def __getitem__(self, key: Any) -> Any:
    index, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
    if np.ndim(index) == 0:
      value = self._row(int(index))
      return value[rest] if rest else value
    values = [self._row(int(r)) for r in np.asarray(index)]
    sample = getattr(self.rows.chunks[0], self.name)
    if not isinstance(sample, np.ndarray):
      return values
    stacked = np.stack(values) if values else sample[:0]
    return stacked[(slice(None), *rest)]
