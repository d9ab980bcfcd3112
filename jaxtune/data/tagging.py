"""Token classification (NER, POS) in CoNLL form: a column of words and a column of their tags per row.

Each word's tag is the label of its first sub-token; the other sub-tokens and the special tokens get
IGNORE and add nothing to the loss or the metrics (as transformers' run_ner.py with
label_all_tokens off). Words cut off by data.max_len are left out of both the labels and the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from jaxtune.data import origin
from jaxtune.data.rows import TokenRows
from jaxtune.errors import UserError

IGNORE = -100  # label of sub-tokens that are not a word's first, and of special tokens


@dataclasses.dataclass(frozen=True)
class Tagged(TokenRows):
  """One tokenised split; row i is input_ids[i] (ragged) with token labels labels[i] (IGNORE where untrained)."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: list[np.ndarray]  # int32 per token: a tag id on each word's first sub-token, IGNORE elsewhere
  num_words: np.ndarray  # int32 words per row before truncation
  ROW_FIELDS: ClassVar[tuple[str, ...]] = ("input_ids", "token_type_ids", "labels", "num_words")


def tag_names(values: Sequence[Any], feature: Any = None) -> list[list[str]]:
  """Each row's tags as strings: ids are mapped through the column's ClassLabel names when it has them."""
  names = getattr(getattr(feature, "feature", None), "names", None)
  return [[names[t] if names is not None and isinstance(t, (int, np.integer)) else str(t) for t in row]
          for row in values]


def check_rows(words: Sequence[Any], tags: Sequence[Sequence[str]], name: str, words_column: str,
               tags_column: str) -> None:
  for row, (w, t) in enumerate(zip(words, tags, strict=True)):
    if not isinstance(w, (list, tuple)) or not w or not all(isinstance(x, str) and x for x in w):
      raise UserError(f"data split {origin.at(name, row)} has {words_column!r} {w!r}, not a non-empty list of "
                      "words; fix or drop the row.")
    if len(t) != len(w):
      raise UserError(f"data split {origin.at(name, row)} has {len(w)} words but {len(t)} tags in {tags_column!r}; "
                      "give one tag per word.")


def label_list(tags: Sequence[Sequence[str]], name: str) -> list[str]:
  """The sorted distinct tags of the training split; their positions are the class ids."""
  labels = sorted({t for row in tags for t in row})
  if len(labels) < 2:
    raise UserError(f"data split {name} has {len(labels)} distinct tag(s); token classification needs at least 2.")
  return labels


def encode(words: Sequence[Sequence[str]], tags: Sequence[Sequence[str]], tokenizer: Any, labels: Sequence[str],
           max_len: int, name: str) -> Tagged:
  """Tokenises pre-split words (truncating to max_len) and puts each word's tag id on its first sub-token."""
  if not getattr(tokenizer, "is_fast", False):
    raise UserError(f"token classification needs a fast tokenizer (word ids); {tokenizer.name_or_path!r} is not "
                    "one: set model.tokenizer to one with a tokenizer.json.")
  ids = {label: i for i, label in enumerate(labels)}
  enc = tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_len,
                  return_token_type_ids=True, verbose=False)
  token_labels = []
  for row, row_tags in enumerate(tags):
    unknown = [t for t in row_tags if t not in ids]
    if unknown:
      raise UserError(f"data split {origin.at(name, row)} has tag {unknown[0]!r}, which the training split does not "
                      f"have (tags: {list(labels)}); fix the row or train on data that has it.")
    word_ids = enc.word_ids(row)
    out = np.full(len(word_ids), IGNORE, np.int32)
    for i, word in enumerate(word_ids):
      if word is not None and (i == 0 or word_ids[i - 1] != word):
        out[i] = ids[row_tags[word]]
    token_labels.append(out)
  as_arrays = lambda rows: [np.asarray(r, np.int32) for r in rows]
  return Tagged(as_arrays(enc["input_ids"]), as_arrays(enc["token_type_ids"]), token_labels,
                np.asarray([len(w) for w in words], np.int32))
