"""Question answering and token classification data and metrics, checked against cases worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from jaxtune.data import qa, tagging
from jaxtune.errors import UserError
from jaxtune.tasks import metrics


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.parametrize("text, normal", [
    ("The Quick, brown fox!", "quick brown fox"),  # case, punctuation and the article go
    ("An apple a day", "apple day"),  # a and an too, as whole words only
    ("the theatre (the other one)", "theatre other one"),  # 'the' inside a word stays
    ("  Denver   Broncos\t", "denver broncos"),  # whitespace collapses
    ("U.S.-led", "usled"),  # punctuation is deleted, not replaced by spaces
])
def test_squad_normalisation(text, normal):
  assert metrics.normalize_answer(text) == normal


def test_squad_exact_match_and_f1_by_hand():
  # pred {cat, on, mat} vs gold {cat, sat, on, mat}: 3 shared, precision 3/3, recall 3/4, F1 = 2 * 0.75 / 1.75
  assert metrics.f1_score("cat on the mat", "The cat sat on a mat") == pytest.approx(6 / 7)
  assert metrics.f1_score("cat cat", "cat") == pytest.approx(2 / 3)  # shared counts are clipped: 1, P 1/2, R 1
  assert metrics.f1_score("", "") == 1.0 and metrics.f1_score("the", "") == 1.0 and metrics.f1_score("x", "") == 0.0
  examples = [qa.Example("a", "q", "c", ("Denver Broncos", "Broncos"), (0, 7)),
              qa.Example("b", "q", "c", ("Santa Clara, California",), (0,)),
              qa.Example("c", "q", "c", (), ())]  # unanswerable: only "" is right
  predictions = {"a": "broncos", "b": "Santa Clara", "c": ""}
  got = metrics.squad(predictions, examples)
  # a: EM 1 (second gold); b: EM 0, F1 with 2 of 3 gold tokens = 2 * 1 * (2/3) / (5/3) = 0.8; c: 1
  assert got == pytest.approx({"exact_match": 2 / 3, "f1": (1 + 0.8 + 1) / 3})
  assert metrics.squad({**predictions, "c": "Denver"}, examples)["exact_match"] == pytest.approx(1 / 3)


def test_long_context_split_by_stride_and_answer_mapped_back(tokenizer):
  filler = " ".join(f"word{i}" for i in range(60))
  context = f"{filler} The treaty was signed in Paris in 1783 by both sides. {filler}"
  start = context.index("Paris in 1783")
  rows = {"id": ["x"], "question": ["  Where was the treaty signed?"], "context": [context],
          "answers": [{"text": ["Paris in 1783"], "answer_start": [start]}]}
  examples = qa.read_examples(rows, "t")
  assert examples[0].question == "Where was the treaty signed?"  # leading spaces stripped, as run_qa.py does
  features = qa.featurize(examples, tokenizer, max_len=64, stride=16, name="t")
  question_len = len(tokenizer("Where was the treaty signed?")["input_ids"])  # [CLS] question [SEP]
  context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
  room = 64 - question_len - 1  # context tokens per window: max_len less the question and the final [SEP]
  assert len(features) == 1 + -(-(len(context_ids) - room) // (room - 16))  # each next window overlaps by 16
  assert all(len(ids) <= 64 for ids in features.input_ids) and set(features.example_index) == {0}
  holders = np.flatnonzero(features.start_positions)
  assert len(holders) >= 1  # the windows that hold the whole answer point at it; the others at [CLS]
  for f in holders:
    s, e = features.start_positions[f], features.end_positions[f]
    assert context[features.offsets[f][s, 0]:features.offsets[f][e, 1]] == "Paris in 1783"
  for f in set(range(len(features))) - set(holders):
    assert features.end_positions[f] == 0
  # one-hot logits at the gold tokens of the last holder come back as the answer's text
  start_logits, end_logits = np.zeros((len(features), 64)), np.zeros((len(features), 64))
  f = holders[-1]
  start_logits[f, features.start_positions[f]] = end_logits[f, features.end_positions[f]] = 10.0
  assert qa.best_spans(start_logits, end_logits, features) == {"x": "Paris in 1783"}
  # SQuAD v2: [CLS] beats the best span by more than the margin -> no answer
  start_logits[:, 0] = end_logits[:, 0] = 11.0
  assert qa.best_spans(start_logits, end_logits, features, null_score_diff=0.0) == {"x": ""}
  assert qa.best_spans(start_logits, end_logits, features, null_score_diff=5.0) == {"x": "Paris in 1783"}
  with pytest.raises(UserError, match="is not the context's text at answer_start"):
    qa.read_examples({**rows, "answers": [{"text": ["Paris"], "answer_start": [start + 1]}]}, "t")


def test_seqeval_entities_with_a_broken_entity_and_first_subtoken_labels(tokenizer):
  words = [["Elizabeth", "Bennet", "walked", "to", "Meryton"], ["Mr.", "Darcy", "left", "Pemberley"]]
  tags = [["B-PER", "I-PER", "O", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]]
  labels = tagging.label_list(tags, "t")
  assert labels == ["B-LOC", "B-PER", "I-PER", "O"]
  data = tagging.encode(words, tags, tokenizer, labels, max_len=32, name="t")
  tokens = tokenizer.convert_ids_to_tokens(data.input_ids[0])
  assert tokens[:5] == ["[CLS]", "elizabeth", "ben", "##net", "walked"]
  assert data.labels[0][:5].tolist() == [tagging.IGNORE, 1, 2, tagging.IGNORE, 3]  # only first sub-tokens count
  gold = [np.where(row == tagging.IGNORE, 0, row) for row in data.labels]
  assert metrics.entities(gold, data, labels)["f1"] == 1.0
  # Row 0 broken: "Bennet" predicted O, so the PER entity is "Elizabeth" alone (wrong span); LOC right.
  # Row 1 right. Gold entities 4, predicted 4, correct 3: precision = recall = F1 = 3/4.
  broken = [row.copy() for row in gold]
  broken[0][2] = labels.index("O")
  got = metrics.entities(broken, data, labels)
  assert got["precision"] == got["recall"] == got["f1"] == pytest.approx(0.75)
  assert got["accuracy"] == pytest.approx(8 / 9) and got["num_words"] == 9
  # An entity opened with I- (no B-) counts as starting there, as in the CoNLL evaluation script.
  opened_with_i = [row.copy() for row in gold]
  opened_with_i[1][1] = labels.index("I-PER")
  assert metrics.entities(opened_with_i, data, labels)["f1"] == 1.0
  cut = tagging.encode(words, tags, tokenizer, labels, max_len=6, name="t")
  assert metrics.entities([np.zeros(6, int)] * 2, cut, labels)["words_cut"] == 9 - cut_words(cut)
  with pytest.raises(UserError, match="has 5 words but 4 tags"):
    tagging.check_rows(words, [tags[0][:4], tags[1]], "t", "tokens", "tags")


def cut_words(data: tagging.Tagged) -> int:
  return sum(int((row != tagging.IGNORE).sum()) for row in data.labels)
