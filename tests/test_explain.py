"""Integrated gradients on the real MiniLM: completeness at the default step count, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.eval import explain
from jaxtune.weights import pretrained

REVIEWS = ["These cookies are wonderful, crisp and not too sweet. My kids ask for them every week.",
           "The coffee tasted burnt and stale, and half the pods were cracked when the box arrived."]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  """all-MiniLM-L6-v2 with a fresh 2-class head (seeded), and its tokenizer."""
  model, params = pretrained.from_pretrained(ModelConfig(path=str(minilm_dir)), 2,
                                             sharding.make_mesh(MeshConfig()), 0)
  return model, params, transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.parametrize("baseline", ["pad", pytest.param("zeros", marks=pytest.mark.slow)])  # one baseline in CI
def test_attributions_sum_to_the_logit_difference(minilm, baseline):
  model, params, tokenizer = minilm
  texts = REVIEWS[1:] if baseline == "pad" else REVIEWS[:1]  # each text length is its own compile: one text each
  found = explain.explain_texts(model, params, tokenizer, texts, 128, ["great", "other"], baseline=baseline)
  for exp in found:
    diff = exp.logit - exp.baseline_logit
    assert abs(diff) > 1e-3  # a real difference to split among the tokens
    assert abs(exp.attributions.sum() - diff) <= 0.01 * abs(diff), (exp.attributions.sum(), diff)
    assert exp.delta <= 0.01
    assert exp.tokens[0] == "[CLS]" and exp.tokens[-1] == "[SEP]" and len(exp.tokens) == len(exp.attributions)
    assert np.count_nonzero(exp.attributions) > len(exp.tokens) // 2


@pytest.mark.slow
def test_target_label_flips_the_explained_logit(minilm):
  model, params, tokenizer = minilm
  (first,), (second,) = (explain.explain_texts(model, params, tokenizer, REVIEWS[:1], 128, ["great", "other"], t)
                         for t in ("great", "other"))
  assert (first.target, second.target) == (0, 1)
  assert not np.allclose(first.attributions, second.attributions)
