"""Our NNX BERT against transformers' PyTorch BERT on the same weights, with padding in the batch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.weights import pretrained

TEXTS = ["The coffee was stale and bitter.", "Great!", "My dog loves these treats, I order them every month."]


def compare(model_dir, attention: str = "auto") -> tuple[float, float]:
  """(max |hidden diff| over real tokens, max |logit diff| of ours with every token's last layer and with the
  first token's alone) between ours and HF's classifier."""
  mesh = sharding.make_mesh(MeshConfig())
  model, params = pretrained.from_pretrained(ModelConfig(path=str(model_dir), attention=attention), 3, mesh, seed=0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  enc = tokenizer(TEXTS, padding=True, return_tensors="np")
  assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
  ref = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
  with torch.no_grad():  # the head is new on both sides: give HF ours
    ref.classifier.weight.copy_(torch.tensor(np.asarray(params["classifier"]["kernel"]).T))
    ref.classifier.bias.copy_(torch.tensor(np.asarray(params["classifier"]["bias"])))
    want = ref(**{k: torch.from_numpy(v) for k, v in enc.items()}, output_hidden_states=True)
  inputs = {k: jnp.asarray(v) for k, v in enc.items()}
  got = model.apply(params, inputs, all_hidden=True)  # every token's last hidden state (the head needs only [CLS]'s)
  real = enc["attention_mask"][..., None].astype(bool)
  hidden = np.abs(np.asarray(got["hidden"]) - want.hidden_states[-1].numpy())
  logits = [np.abs(np.asarray(out["logits"]) - want.logits.numpy()).max() for out in (got, model.apply(params, inputs))]
  return float(hidden[np.broadcast_to(real, hidden.shape)].max()), float(max(logits))


@pytest.mark.parametrize("attention", ["auto", "reference", "splash"])  # splash: TPU's kernel, interpreted
def test_real_minilm_matches_transformers(minilm_dir, attention):
  hidden, logits = compare(minilm_dir, attention)
  assert hidden <= 1e-4 and logits <= 1e-4, (hidden, logits)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_tiny_random_bert_matches_transformers(tmp_path, minilm_dir, act):
  from conftest import save_tiny_bert

  save_tiny_bert(tmp_path, minilm_dir, seed=1, hidden_act=act, type_vocab_size=3)
  hidden, logits = compare(tmp_path)
  assert hidden <= 1e-4 and logits <= 1e-4, (hidden, logits)
