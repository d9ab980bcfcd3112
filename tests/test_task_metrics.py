"""Task metrics against a reference: BLEU and ROUGE worked by hand, classification against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from jaxtune.tasks import metrics


def test_bleu_by_hand():
  # hyp "the cat sat on the mat" vs ref "the cat sat on a mat", 6 tokens each (brevity penalty 1):
  # clipped n-gram precisions 5/6 (one "the" of two), 3/5, 2/4, 1/3; BLEU = their geometric mean.
  want = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25 * 100
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(want)
  # A hypothesis of 4 tokens against a reference of 6: every n-gram matches, brevity penalty exp(1 - 6/4).
  assert metrics.bleu(["the cat sat on"], ["the cat sat on a mat"]) == pytest.approx(100 * math.exp(1 - 6 / 4))
  assert metrics.bleu(["completely different words here"], ["the cat sat on a mat"]) == 0.0


def test_rouge_on_rouge_scores_readme_example_by_hand():
  # rouge-score's README pair, stemmed and lower-cased: target 9 tokens, prediction 8.
  got = metrics.rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
  f = lambda p, r: 2 * p * r / (p + r)
  assert got["rouge1"] == pytest.approx(f(6 / 8, 6 / 9))  # the x2, quick, brown, dog, jump(s)
  assert got["rouge2"] == pytest.approx(f(2 / 7, 2 / 8))  # "the quick", "quick brown"
  assert got["rougeL"] == pytest.approx(f(5 / 8, 5 / 9))  # LCS: the quick brown jumps the
  assert metrics.rouge(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)  # the mean over examples


def test_classification_accuracy_and_macro_f1_match_scikit_learn():
  """Macro F1 averages over every class of the label set, one that is never predicted nor present counting 0."""
  rng = np.random.default_rng(0)
  labels, preds = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
  preds[labels == 1] = 0  # class 1 is never predicted: its F1 is 0
  got = metrics.classification(preds, labels, np.full(50, 0.5), num_classes=4)  # class 3: in the label set only
  assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
  assert got["macro_f1"] == pytest.approx(sk.f1_score(labels, preds, labels=range(4), average="macro",
                                                      zero_division=0))
  assert got["num_examples"] == 50 and got["loss"] == 0.5
