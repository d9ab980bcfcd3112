"""Extractive question answering (SQuAD form): features with a document stride, answer spans, SQuAD metrics.

A row holds `id`, `question`, `context` and `answers` ({"text": [...], "answer_start": [...]}, both
empty for an unanswerable SQuAD v2 question). A context longer than the window is split into
features of at most max_len tokens that overlap by `stride` tokens; each feature is the question,
then its piece of the context. A feature is trained to point at the answer's first and last tokens,
or at [CLS] (index 0) when the answer is not wholly inside its piece (or there is none).

Predictions follow the SQuAD reference post-processing: for every feature, the n_best highest start
and end logits give candidate spans inside its context (start <= end, at most max_answer_len
tokens) scored by start + end logit; an example's answer is its best span over all its features, as
the text of the context between the span's character offsets. With `null_score_diff` set (SQuAD v2),
the example is unanswered when the smallest [CLS] score over its features beats the best span by more
than that margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data.origin import At
from jaxtune.data.rows import TokenRows
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  question: str
  context: str
  answers: tuple[str, ...]  # gold answer texts; () when the question has no answer
  answer_starts: tuple[int, ...]  # their character offsets in the context


@dataclasses.dataclass(frozen=True)
class Features(TokenRows):
  """One tokenised split; feature i is input_ids[i] (ragged) from example example_index[i]."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  start_positions: np.ndarray  # int32 token index of the answer's first token, 0 ([CLS]) if not in the feature
  end_positions: np.ndarray  # int32 token index of its last token
  offsets: list[np.ndarray]  # int32 T x 2 character span of each token in the context; -1 outside the context
  example_index: np.ndarray  # int32 feature -> row of `examples`
  examples: list[Example]


def read_examples(rows: dict[str, Sequence[Any]], name: str, id_column: str = "id", question_column: str = "question",
                  context_column: str = "context", answers_column: str = "answers") -> list[Example]:
  """Examples of SQuAD-form columns, checked: every answer must be the context's text at its start."""
  for column in (question_column, context_column, answers_column):
    if column not in rows:
      raise UserError(f"data split {name} has no column {column!r} (it has {sorted(rows)}); question answering "
                      "reads SQuAD-form rows: set data.question_column / data.context_column / data.answers_column.")
  n = len(rows[context_column])
  ids = rows[id_column] if id_column in rows else [str(i) for i in range(n)]
  examples = []
  for row in range(n):
    question, context, answers = rows[question_column][row], rows[context_column][row], rows[answers_column][row]
    where = At(name, row)  # formatted (the files read) only if the row is bad
    if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context.strip():
      raise UserError(f"{where} has an empty or non-text question or context; fill or drop that row.")
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), (list, tuple)) or not isinstance(
        answers.get("answer_start"), (list, tuple)) or len(answers["text"]) != len(answers["answer_start"]):
      raise UserError(f"{where} has answers {answers!r}; give {{'text': [...], 'answer_start': [...]}} of equal "
                      "length (both empty for a question without an answer).")
    texts, starts = tuple(str(t) for t in answers["text"]), tuple(int(s) for s in answers["answer_start"])
    for text, start in zip(texts, starts):
      if context[start:start + len(text)] != text:
        raise UserError(f"{where}: answer {text!r} is not the context's text at answer_start {start} (it reads "
                        f"{context[start:start + len(text)]!r}); fix the offset (characters, from 0).")
    examples.append(Example(str(ids[row]), question.lstrip(), context, texts, starts))
  return examples


def featurize(examples: Sequence[Example], tokenizer: Any, max_len: int, stride: int, name: str) -> Features:
  """Features of `examples`: the question, then windows of the context overlapping by `stride` tokens."""
  if not getattr(tokenizer, "is_fast", False):
    raise UserError(f"question answering needs a fast tokenizer (offset mappings); {tokenizer.name_or_path!r} is "
                    "not one: set model.tokenizer to one with a tokenizer.json.")
  try:
    enc = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                    max_length=max_len, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    return_token_type_ids=True, verbose=False)
  except Exception as e:  # a question longer than the window leaves no room for the context
    raise UserError(f"data split {name}: the tokenizer could not window the contexts ({type(e).__name__}: {e}); "
                    "raise data.max_len, lower data.doc_stride, or shorten the questions.") from None
  n = len(enc["input_ids"])
  starts, ends = np.zeros(n, np.int32), np.zeros(n, np.int32)
  offsets, sample = [], np.asarray(enc["overflow_to_sample_mapping"], np.int32)
  for i in range(n):
    in_context = np.asarray([s == 1 for s in enc.sequence_ids(i)])
    span = np.asarray(enc["offset_mapping"][i], np.int32).reshape(-1, 2)
    span[~in_context] = -1
    offsets.append(span)
    example = examples[sample[i]]
    if not example.answers:
      continue
    first_char, last_char = example.answer_starts[0], example.answer_starts[0] + len(example.answers[0])
    tokens = np.flatnonzero(in_context)
    if span[tokens[0], 0] > first_char or span[tokens[-1], 1] < last_char:
      continue  # the answer is not wholly in this window: point at [CLS]
    # as transformers' run_qa.py: the last token starting at or before the answer, the first ending at or after it
    starts[i] = tokens[np.searchsorted(span[tokens, 0], first_char, side="right") - 1]
    ends[i] = tokens[np.searchsorted(span[tokens, 1], last_char, side="left")]
  as_arrays = lambda rows: [np.asarray(r, np.int32) for r in rows]
  return Features(as_arrays(enc["input_ids"]), as_arrays(enc["token_type_ids"]), starts, ends, offsets, sample,
                  list(examples))


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, data: Features, n_best: int = 20,
               max_answer_len: int = 30, null_score_diff: float | None = None) -> dict[str, str]:
  """Example id -> predicted answer text ("" when unanswered); logits are F x L, padded beyond each feature."""
  best: dict[int, tuple[float, str]] = {}
  null: dict[int, float] = {}
  for f in range(len(data)):
    example, offsets = int(data.example_index[f]), data.offsets[f]
    start, end = start_logits[f, :len(offsets)], end_logits[f, :len(offsets)]
    null[example] = min(null.get(example, np.inf), float(start[0] + end[0]))
    top = lambda logits: np.argsort(-logits, kind="stable")[:n_best]
    for s in top(start):
      for e in top(end):
        if offsets[s, 0] < 0 or offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_len:
          continue  # outside the context, reversed or too long
        score = float(start[s] + end[e])
        if example not in best or score > best[example][0]:
          text = data.examples[example].context[offsets[s, 0]:offsets[e, 1]]
          best[example] = (score, text)
  answers = {}
  for i, example in enumerate(data.examples):
    score, text = best.get(i, (-np.inf, ""))
    if null_score_diff is not None and null.get(i, -np.inf) - score > null_score_diff:
      text = ""
    answers[example.id] = text
  return answers
