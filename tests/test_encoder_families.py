"""BERT, RoBERTa, XLM-R, DistilBERT and ELECTRA with sequence, span (QA) and token heads against transformers'
PyTorch classes on tiny random checkpoints, padding in the batch; and their exports back to those classes."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import export_run
from test_export import MESH, load_exported, perturbed, save_run

from jaxtune.config import ModelConfig
from jaxtune.weights import pretrained

TINY = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "max_position_embeddings": 40}
CONFIGS = {
    "bert": transformers.BertConfig(**TINY, type_vocab_size=3),
    "roberta": transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1),
    "xlm-roberta": transformers.XLMRobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1, hidden_act="gelu_new"),
    "distilbert": transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                max_position_embeddings=40),
    "electra": transformers.ElectraConfig(**{**TINY, "hidden_size": 48}, embedding_size=24),  # projected embeddings
}
HEADS = {"classification": "ForSequenceClassification", "question_answering": "ForQuestionAnswering",
         "token_classification": "ForTokenClassification"}
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
                "electra": "Electra"}
NUM_LABELS = 5


def hf_class(family: str, head: str):
  return getattr(transformers, CLASS_PREFIX[family] + HEADS[head])


def batch(family: str):
  """Right-padded ids with the family's pad token, a mask and (where the family has them) token types."""
  cfg = CONFIGS[family]
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (3, 12))
  mask = np.ones_like(ids)
  mask[1, 7:] = mask[2, 3:] = 0
  ids[mask == 0] = cfg.pad_token_id
  inputs = {"input_ids": ids, "attention_mask": mask}
  if family == "bert":
    inputs["token_type_ids"] = (np.arange(12)[None] >= 5).astype(np.int64) * mask * 2
  return inputs


@pytest.fixture(params=[(f, h) for f in CONFIGS for h in HEADS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
  """(family, head, checkpoint dir, the PyTorch model): a random task model saved HF-style."""
  family, head = request.param
  torch.manual_seed(0)
  num_labels = 2 if head == "question_answering" else NUM_LABELS  # start and end
  config = CONFIGS[family].__class__.from_dict({**CONFIGS[family].to_dict(), "num_labels": num_labels})
  source = hf_class(family, head)(config).eval()
  path = tmp_path_factory.mktemp(f"{family}_{head}")
  source.save_pretrained(path)
  return family, head, path, source


def torch_logits(model, inputs) -> np.ndarray:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
  if hasattr(out, "start_logits"):
    return torch.stack([out.start_logits, out.end_logits], -1).numpy()
  return out.logits.numpy()


def real_rows(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-token outputs at real tokens only (what padding may not change); sequence logits as they are."""
  return logits if logits.ndim == 2 else logits[mask.astype(bool)]


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("attention", ["reference", "splash"])  # splash: TPU's kernel, interpreted on this CPU
def test_every_family_matches_transformers_under_each_attention_kernel(family, attention, tmp_path):
  torch.manual_seed(0)
  config = CONFIGS[family].__class__.from_dict({**CONFIGS[family].to_dict(), "num_labels": NUM_LABELS})
  source = hf_class(family, "token_classification")(config).eval()
  source.save_pretrained(tmp_path)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=(), attention=attention),
                                             NUM_LABELS, MESH, 0, head="token_classification")
  inputs = batch(family)
  ours = np.asarray(model.apply(params, {k: jnp.asarray(v) for k, v in inputs.items()})["logits"])
  mask = inputs["attention_mask"]
  assert np.abs(real_rows(ours, mask) - real_rows(torch_logits(source, inputs), mask)).max() <= 1e-4


def test_logits_match_transformers_and_the_export_round_trips(case, tmp_path):
  family, head, path, source = case
  model, params = pretrained.from_pretrained(ModelConfig(path=str(path), new_params=()), NUM_LABELS, MESH, 0,
                                             head=head)
  inputs = batch(family)
  mask = inputs["attention_mask"]
  apply = lambda p: np.asarray(model.apply(p, {k: jnp.asarray(v) for k, v in inputs.items()})["logits"])
  ours, theirs = apply(params), torch_logits(source, inputs)
  assert ours.shape == theirs.shape
  assert np.abs(real_rows(ours, mask) - real_rows(theirs, mask)).max() <= 1e-4
  # Export: perturbed weights, saved as a run, written as an HF directory, loaded by the same class.
  params = perturbed(params, 1)
  labels = None if head == "question_answering" else [f"L{i}" for i in range(NUM_LABELS)]
  save_run(tmp_path / "run", model, params, step=2, labels=labels)
  out = export_run(tmp_path / "run", "latest", tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [hf_class(family, head).__name__]
  if labels:
    assert config["id2label"] == {str(i): label for i, label in enumerate(labels)}
  exported = torch_logits(load_exported(out, hf_class(family, head)), inputs)
  assert np.abs(real_rows(apply(params), mask) - real_rows(exported, mask)).max() <= 1e-4
  # the noise moved the model, so the match is the export's doing
  assert np.abs(real_rows(theirs, mask) - real_rows(exported, mask)).max() > 1e-3
