"""The Python API (jaxtune/api.py): docs/api.md's examples run as written, and configs built from names,
mappings and overrides."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from conftest import REPO, write_config

import jaxtune
from jaxtune import config
from jaxtune.errors import UserError
from jaxtune.eval import evaluate

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)


def run_block(code: str, where, monkeypatch, capsys) -> str:
  monkeypatch.chdir(where)
  exec(compile(code, "docs/api.md", "exec"), {"__name__": "__docs__"})
  return capsys.readouterr().out


@pytest.mark.slow  # about a minute of MiniLM; the same calls on the tiny BERT below run in the default suite
def test_the_classifier_example_runs_as_written(tmp_path, monkeypatch, capsys):
  out = run_block(BLOCKS[0], tmp_path, monkeypatch, capsys)
  lines = out.strip().splitlines()[-4:]  # after the run's own report
  assert lines[0].startswith("finished ") and re.match(r"test accuracy 0\.\d{3} on 100 reviews", lines[1]), out
  assert all(line.split()[0] in ("great", "other") for line in lines[2:]), out
  assert (tmp_path / "runs" / "api_smoke" / "summary.json").exists()


def test_finetune_evaluate_load_and_predict_on_a_tiny_bert(tmp_path, tiny_bert_dir, reviews):
  """The classifier example's calls, on the tiny BERT: the result, a test score equal to evaluate's, predictions
  equal to the model's own argmax."""
  cfg = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews)
  result = jaxtune.finetune(cfg, tmp_path / "run", train={"max_steps": 4, "eval_every": 2})
  assert result.summary["status"] == "finished" and result.summary["step"] == 4
  assert result.metrics["accuracy"] == result.summary["last_eval"]["accuracy"]
  test = jaxtune.evaluate(tmp_path / "run", step="latest", split="test")
  assert test == evaluate.evaluate_checkpoint(tmp_path / "run", "latest", "test")
  model, tokenizer = jaxtune.load(tmp_path / "run")
  texts = [str(t) for t in pd.read_csv(reviews["test"])["review"][:5]]
  guesses = model.predict(texts)
  assert [set(g["probabilities"]) for g in guesses] == [{"great", "other"}] * 5
  assert all(abs(sum(g["probabilities"].values()) - 1) < 1e-5 for g in guesses)
  assert tokenizer is model.tokenizer and model.task == "classification"
  with pytest.raises(UserError, match="generate is for causal_lm, preference and seq2seq"):
    model.generate(texts)


@pytest.mark.slow  # a GGUF read and a generation compile; tests/test_smollm2_parity.py checks the answers themselves
def test_the_decoder_example_runs_as_written(tmp_path, monkeypatch, capsys):
  out = run_block(BLOCKS[1], tmp_path, monkeypatch, capsys)
  assert "Paris" in out, out


def test_configs_from_names_mappings_and_overrides():
  base = config.load("minilm_reviews")
  assert jaxtune.make_config("minilm_reviews") == base
  tuned = jaxtune.make_config("minilm_reviews", optim={"lr": 1e-4}, train={"max_steps": 7},
                                 **{"data.max_len": 64, "data.length_buckets": [64]})
  assert (tuned.optim.lr, tuned.optim.warmup_steps, tuned.train.max_steps, tuned.data.max_len) == (
      1e-4, base.optim.warmup_steps, 7, 64)  # a section merges key by key
  assert jaxtune.make_config(config.to_dict(tuned)) == jaxtune.make_config(tuned) == tuned
  with pytest.raises(UserError, match="config key optim.lr "):
    jaxtune.make_config(base, optim={"lr": -1})
  with pytest.raises(UserError, match="needs run_dir"):
    jaxtune.finetune(base)
  with pytest.raises(AttributeError):
    jaxtune.no_such_function  # noqa: B018
