"""Sequence-to-sequence rows (translation, summarization): a source text and a target text per row.

The source (after an optional prefix such as "translate English to German: ") and the target are
tokenised as the model's tokenizer does for its encoder and its labels (T5 appends </s>; BART wraps
both in <s> ... </s>) and truncated. The decoder is teacher-forced: its input is the target shifted
right by one, starting with the model's decoder_start_token_id, and it is trained to predict every
target token, the loss normalised by the true number of target tokens in the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from jaxtune.data import origin
from jaxtune.data.batching import pad_length
from jaxtune.data.rows import TokenRows
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pairs(TokenRows):
  """One tokenised split; row i is source input_ids[i] (ragged) with target token ids labels[i] (ragged)."""
  input_ids: list[np.ndarray]
  labels: list[np.ndarray]
  sources: list[str]  # the texts, for generation
  references: list[str]  # the target texts, for BLEU / ROUGE
  ROW_FIELDS: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "sources", "references")

  @functools.cached_property  # collate reads it for every batch
  def target_lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.labels), np.int32, len(self.labels))

  @functools.cached_property
  def max_token_id(self) -> int:
    return max((int(x.max()) for rows in (self.input_ids, self.labels) for x in rows if len(x)), default=0)


def encode(sources: Sequence[Any], targets: Sequence[Any], tokenizer: Any, prefix: str, max_len: int,
           max_target_len: int, name: str) -> Pairs:
  """Tokenised sources (prefixed, truncated to max_len) and targets (truncated to max_target_len)."""
  for column, texts in (("source", sources), ("target", targets)):
    for row, text in enumerate(texts):
      if not isinstance(text, str) or not text.strip():
        raise UserError(f"data split {origin.at(name, row)} has an empty or non-text {column} ({text!r}); fill or "
                        "drop that row.")
  src = tokenizer([prefix + s for s in sources], max_length=max_len, truncation=True, verbose=False)["input_ids"]
  tgt = tokenizer(text_target=list(targets), max_length=max_target_len, truncation=True, verbose=False)["input_ids"]
  as_arrays = lambda rows: [np.asarray(r, np.int32) for r in rows]
  return Pairs(as_arrays(src), as_arrays(tgt), list(sources), list(targets))


def collate(data: Pairs, rows: np.ndarray, batch_size: int, buckets: Sequence[int], max_len: int,
            max_target_len: int, part: slice = slice(None)) -> dict[str, np.ndarray]:
  """Padded batch: input_ids, attention_mask (B x S); labels, label_mask (B x T).

  S and T come from the lengths of every row of the global batch (each padded to its smallest bucket that
  fits); only rows `part` are built (and read). The model makes its decoder input from the labels
  (`layers.shift_right`).
  """
  s = pad_length(int(data.lengths[rows].max()), buckets, max_len)
  t = pad_length(int(data.target_lengths[rows].max()), buckets, max_target_len)
  mine = np.arange(batch_size)[part]
  real = rows[mine[mine < len(rows)]]
  batch = {k: np.zeros((len(mine), s), np.int32) for k in ("input_ids", "attention_mask")}
  batch["labels"] = np.zeros((len(mine), t), np.int32)
  batch["label_mask"] = np.zeros((len(mine), t), np.float32)
  for i, r in enumerate(real):
    source, target = data.input_ids[r], data.labels[r]
    batch["input_ids"][i, :len(source)] = source
    batch["attention_mask"][i, :len(source)] = 1
    batch["labels"][i, :len(target)] = target
    batch["label_mask"][i, :len(target)] = 1
  return batch

