"""Question answering and token classification end to end on the tiny BERT and real tweets (WNUT-16 via
scripts/wnut16.py): fine-tune, evaluate (with the QA predictions file) and export to transformers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from conftest import export_run, records, run_script
from test_export import load_exported

from jaxtune import config, sharding
from jaxtune.config import MeshConfig
from jaxtune.errors import UserError
from jaxtune.eval import evaluate
from jaxtune.tasks.spans import words_tokenizer
from jaxtune.train import loop, restore


@pytest.fixture(scope="module")
def wnut16(tmp_path_factory):
  out = tmp_path_factory.mktemp("wnut16")
  result = run_script("wnut16.py", "--out", out)
  assert result.returncode == 0, result.stderr
  return out


def run_config(path, model_dir, task: str, data: dict, **sections):
  cfg = {"task": task, "model": {"path": str(model_dir)}, "data": {"max_len": 64, **data},  # one compiled shape
         "optim": {"lr": 2e-3, "warmup_steps": 1},
         "train": {"batch_size": 16, "eval_batch_size": 32, "max_steps": 6, "log_every": 1},
         "checkpoint": {"best_metric": "f1"}, **sections}
  path.write_text(yaml.safe_dump(cfg))
  return config.load(path)


def outputs_of(run_dir, hf_class, texts) -> tuple[np.ndarray, np.ndarray]:
  """(our logits, the exported model's logits) of the run's latest step on a padded batch of `texts`."""
  cfg, model, params, _, _ = restore.restore(run_dir, "latest", sharding.make_mesh(MeshConfig()))
  out = export_run(run_dir, "latest", run_dir.parent / "hf")
  hf = load_exported(out, hf_class)
  enc = transformers.AutoTokenizer.from_pretrained(out)(*texts, padding=True, return_tensors="np")
  ours = np.asarray(model.apply(params, {k: jnp.asarray(v) for k, v in enc.items()})["logits"])
  with torch.no_grad():
    got = hf(**{k: torch.from_numpy(v) for k, v in enc.items()})
  theirs = torch.stack([got.start_logits, got.end_logits], -1) if hasattr(got, "start_logits") else got.logits
  real = enc["attention_mask"].astype(bool)
  return ours[real], theirs.numpy()[real]


def test_question_answering_end_to_end(tmp_path, tiny_bert_dir, wnut16):
  qa = wnut16 / "qa"
  cfg = run_config(tmp_path / "qa.yaml", tiny_bert_dir, "question_answering",
                   {"train": str(qa / "train.jsonl"), "validation": str(qa / "validation.jsonl"),
                    "test": str(qa / "test.jsonl")}, qa={"doc_stride": 16})
  loop.fit(cfg, tmp_path / "run", quiet=True)
  evals = [r for r in records(tmp_path / "run") if r.get("split") == "validation"]
  assert [e["step"] for e in evals] == [6] and {"exact_match", "f1", "num_features"} <= evals[-1].keys()
  assert evaluate.evaluate_checkpoint(tmp_path / "run", "base", "validation")["loss"] > evals[-1]["loss"]
  result = run_script("evaluate.py", "--checkpoint", tmp_path / "run", "--split", "test")
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(result.stdout.splitlines()[0])
  predictions = json.loads((tmp_path / "run" / "eval" / "test-6.predictions.json").read_text())
  ids = [json.loads(line)["id"] for line in (qa / "test.jsonl").read_text().splitlines()]
  assert sorted(predictions) == sorted(ids) and metrics["num_examples"] == len(ids)
  assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 1
  ours, theirs = outputs_of(tmp_path / "run", transformers.BertForQuestionAnswering,
                            (["Which company is mentioned?"], ["Google and Apple released phones today ."]))
  assert np.abs(ours - theirs).max() <= 1e-4


def test_token_classification_end_to_end(tmp_path, tiny_bert_dir, wnut16):
  ner = wnut16 / "ner"
  cfg = run_config(tmp_path / "ner.yaml", tiny_bert_dir, "token_classification",
                   {"train": str(ner / "train.jsonl"), "validation": str(ner / "validation.jsonl"),
                    "test": str(ner / "test.jsonl")})
  loop.fit(cfg, tmp_path / "run", quiet=True)
  losses = [r["loss"] for r in records(tmp_path / "run") if "grad_norm" in r]
  assert losses[-1] < losses[0]
  got = evaluate.evaluate_checkpoint(tmp_path / "run", "latest", "test")
  assert got["num_examples"] == 400 and {"precision", "recall", "f1", "accuracy"} <= got.keys()
  base = evaluate.evaluate_checkpoint(tmp_path / "run", "base", "test")
  assert base["loss"] > got["loss"]
  ours, theirs = outputs_of(tmp_path / "run", transformers.BertForTokenClassification,
                            (["Obama visited Paris with Google staff ."],))
  assert np.abs(ours - theirs).max() <= 1e-4
  with pytest.raises(UserError, match="has tag 'B-nope', which the training split does not have"):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"tokens": ["x"], "ner_tags": ["B-nope"]}) + "\n")
    evaluate.evaluate_checkpoint(tmp_path / "run", "latest", data_file=str(tmp_path / "bad.jsonl"))


def test_split_words_reach_byte_level_bpe_tokenizers_with_a_prefix_space(tmp_path):
  """RoBERTa's tokenizer refuses pre-split words unless loaded with add_prefix_space=True."""
  from tokenizers import ByteLevelBPETokenizer

  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(["Elizabeth walked to Meryton with Mr Darcy"] * 10, vocab_size=300, min_frequency=1)
  bpe.save_model(str(tmp_path))
  transformers.RobertaTokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt")
                                    ).save_pretrained(tmp_path / "tok")
  plain = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  words = words_tokenizer(plain)
  assert words is not plain and words.add_prefix_space
  ids = words([["Elizabeth", "walked"]], is_split_into_words=True)["input_ids"][0]
  assert ids == words(" Elizabeth walked")["input_ids"]  # each word as it would be mid-sentence
