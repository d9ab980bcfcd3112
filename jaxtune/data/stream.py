"""Causal-LM train batches read lazily from a streamed dataset, with a position that resumes them exactly.

The stream is read in consecutive windows of `window` rows; each window is shuffled by a seeded
permutation of (seed, epoch, window index), encoded, and its examples are packed into rows (or put
one per row) as `lm.pack` / `lm.pad_rows` would. Rows continue across epochs: when the source ends,
the next epoch starts it again.

A position (JSON, saved with every checkpoint) names the example that the last batch ended in: the
source's own `state_dict()` at the start of that example's window (None at the start of an epoch),
the window and epoch numbers, the example's index in the shuffled window and how many of its tokens
were used. Resuming re-reads that one window from the source state, so every example of an epoch is
trained on once, in the same order and the same rows as without the interruption.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np

from jaxtune.data import lm, origin
from jaxtune.errors import UserError

Position = dict[str, Any]  # {"epoch", "window", "source", "example", "offset"}
START: Position = {"epoch": 0, "window": 0, "source": None, "example": 0, "offset": 0}


class LMStream:
  """Batches of `batch_size` LM rows from `open_source()` (a fresh IterableDataset each call).

  `encode(rows, name)` turns a window's rows (a list of dicts) into examples: whole documents when
  `pack` is true, else examples cut to seq_len + 1 tokens.
  """

  def __init__(self, open_source: Callable[[], datasets.IterableDataset],
               encode: Callable[[list[dict[str, Any]], str], list[lm.Example]], seq_len: int, batch_size: int,
               seed: int, window: int, pack: bool, name: str):
    self.open_source, self.encode = open_source, encode
    self.seq_len, self.batch_size, self.seed, self.window, self.pack, self.name = (
        seq_len, batch_size, seed, window, pack, name)

  def batches(self, position: Position | None = None) -> Iterator[tuple[lm.LMExamples, Position]]:
    """(batch, the position just after it), endlessly, from `position` (the stream's start if None)."""
    rows: list[list[lm.Example]] = []
    packer = lm.Packer(self.seq_len)
    for where, tokens, mask in self._examples(position or START):
      if self.pack:
        filled = packer.add(tokens, mask, where["offset"])
      else:  # one example per row, cut at seq_len; it is used up at once
        filled = iter([([(tokens[:self.seq_len], mask[:self.seq_len])], len(tokens))])
      for row, used in filled:
        rows.append(row)
        if len(rows) == self.batch_size:
          yield lm._assemble(rows, self.seq_len), {**where, "offset": used}
          rows = []

  def _examples(self, position: Position) -> Iterator[tuple[Position, np.ndarray, np.ndarray]]:
    """(position of the example with its offset, tokens, target mask) from `position` on, epoch after epoch."""
    epoch, window, source = position["epoch"], position["window"], position["source"]
    skip, offset = position["example"], position["offset"]
    while True:
      ds = self.open_source()
      if source is not None:
        ds.load_state_dict(copy.deepcopy(source))
      rows_read = window > 0
      it = iter(ds)
      while raw := list(itertools.islice(it, self.window)):
        rows_read = True
        after = copy.deepcopy(ds.state_dict())  # where the next window starts
        order = np.random.default_rng([self.seed, epoch, window]).permutation(len(raw))
        # the window's rows are rows window * self.window + ... of the source's epoch: its row errors name them
        where = origin.renamed(f"{self.name} (epoch {epoch}, window {window})", self.name, window * self.window + order)
        examples = self.encode([raw[i] for i in order], where)
        for i in range(skip, len(examples)):
          tokens, mask = examples[i]
          start = offset if i == skip else 0
          if start < len(tokens):
            yield {"epoch": epoch, "window": window, "source": source, "example": i, "offset": start}, tokens, mask
        skip = offset = 0
        window, source = window + 1, after
      if not rows_read:
        raise UserError(f"data split {self.name} streams no rows; point data.train at non-empty files.")
      epoch, window, source = epoch + 1, 0, None
