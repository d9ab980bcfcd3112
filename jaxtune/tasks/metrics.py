"""Task metrics: what each task reports on a split, from its predictions and the gold data.

Classification accuracy and macro F1; SQuAD exact match and F1 (the official script's normalisation);
seqeval's entity precision / recall / F1; exact match of generations; corpus BLEU (sacrebleu) and ROUGE
(rouge-score) of generated text.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data import qa, tagging


def classification(preds: np.ndarray, labels: np.ndarray, losses: np.ndarray, num_classes: int) -> dict[str, float]:
  """accuracy, macro F1 (mean over classes of the training label set), mean loss, example count."""
  f1s = []
  for c in range(num_classes):
    tp = np.sum((preds == c) & (labels == c))
    denom = np.sum(preds == c) + np.sum(labels == c)
    f1s.append(2 * tp / denom if denom else 0.0)
  return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s)),
          "loss": float(np.mean(losses)), "num_examples": len(labels)}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU (0-100) of sacrebleu with its defaults (13a tokenisation, exponential smoothing off for
  the corpus, one reference per prediction), the score WMT results quote."""
  import sacrebleu

  return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measures (0-1) of rouge-score, with its Porter stemmer."""
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
  return {k: float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0 for k in ("rouge1", "rouge2", "rougeL")}


def normalize_answer(text: str) -> str:
  """The SQuAD evaluation script's normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_PUNCTUATION = frozenset(string.punctuation)


def f1_score(prediction: str, truth: str) -> float:
  """Token-overlap F1 of the normalised texts (1 if both are empty, 0 if only one is)."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
  if not pred or not gold:
    return float(pred == gold)
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad(predictions: dict[str, str], examples: Sequence[qa.Example]) -> dict[str, float]:
  """exact_match and f1 (fractions, x100 for the usual SQuAD figures): each the best over an example's gold
  answers; a question without answers counts as answered correctly only by ""."""
  em = f1 = 0.0
  for example in examples:
    golds = example.answers or ("",)
    prediction = predictions[example.id]
    em += max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    f1 += max(f1_score(prediction, g) for g in golds)
  n = max(len(examples), 1)
  return {"exact_match": em / n, "f1": f1 / n}


def entities(preds: Sequence[np.ndarray], data: tagging.Tagged, labels: Sequence[str]) -> dict[str, float]:
  """Entity-level precision / recall / F1 (seqeval, CoNLL evaluation rules) and token accuracy over the words
  that fit; preds[i] holds row i's predicted tag id per token."""
  from seqeval import metrics as seqeval

  gold, pred = [], []
  for row in range(len(data)):
    first = data.labels[row] != tagging.IGNORE
    gold.append([labels[t] for t in data.labels[row][first]])
    pred.append([labels[t] for t in np.asarray(preds[row])[:len(first)][first]])
  words = sum(len(g) for g in gold)
  correct = sum(int(a == b) for g, p in zip(gold, pred) for a, b in zip(g, p))
  return {"precision": float(seqeval.precision_score(gold, pred, zero_division=0)),
          "recall": float(seqeval.recall_score(gold, pred, zero_division=0)),
          "f1": float(seqeval.f1_score(gold, pred, zero_division=0)), "accuracy": correct / max(words, 1),
          "num_examples": len(data), "num_words": words, "words_cut": int(data.num_words.sum()) - words}


def exact_match(outputs: Sequence[Sequence[int]], eos: Sequence[int], tokenizer: Any,
                responses: Sequence[str]) -> dict[str, Any]:
  """exact_match: the share of generations (EOS dropped, decoded, stripped) equal to their stripped response."""
  texts = [tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True).strip() for out in outputs]
  hits = [t == r.strip() for t, r in zip(texts, responses, strict=True)]
  return {"exact_match": sum(hits) / len(hits), "samples": texts[:5]}
