"""Causal-LM fine-tuning end to end on a tiny Llama: packed text, chat instructions, loss normalisation."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import transformers
import yaml
from conftest import export_run, lm_config, records, run_script

from jaxtune import config, sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.data import splits
from jaxtune.errors import UserError
from jaxtune.eval import evaluate
from jaxtune.tasks import TASKS, text
from jaxtune.tools import torch_ref
from jaxtune.train import loop, steps
from jaxtune.weights import pretrained

LM = TASKS["causal_lm"]


def test_packed_text_finetune_lowers_loss_and_evaluate_reproduces_it(tmp_path, tiny_llama_dir, reviews):
  """On plain .txt files named by a glob: one review per line, two files."""
  texts = pd.read_csv(reviews["train"])["review"].str.replace("\n", " ")
  for i, part in enumerate((texts[:48], texts[48:])):
    (tmp_path / f"part{i}.txt").write_text("\n".join(part) + "\n")
  cfg = lm_config(tmp_path, tiny_llama_dir, {**reviews, "train": tmp_path / "part*.txt"}, pack=True)
  loop.fit(config.load(cfg), tmp_path / "run", quiet=True)  # in process: the CLIs are tested elsewhere
  evals = [r for r in records(tmp_path / "run") if r.get("split") == "validation"]
  assert [e["step"] for e in evals] == [3, 6] and evals[1]["loss"] < evals[0]["loss"]
  assert evals[1]["perplexity"] == pytest.approx(np.exp(evals[1]["loss"]), rel=1e-6)
  got = evaluate.evaluate_checkpoint(tmp_path / "run", "latest", "validation")
  assert got["num_tokens"] == evals[1]["num_tokens"] and abs(got["loss"] - evals[1]["loss"]) < 1e-5
  assert evaluate.evaluate_checkpoint(tmp_path / "run", "base", "validation")["loss"] > got["loss"]


@pytest.mark.slow  # ~30 s; chat encoding is in test_lm_data, generation in test_generate and test_smollm2_parity
def test_chat_instruction_finetune_and_exact_match(tmp_path, tiny_llama_dir, reviews):
  cfg = lm_config(tmp_path, tiny_llama_dir, reviews, prompt_template="Great or other?\n{review:.120}",
                  response_column="score", use_chat_template=True, max_len=128)
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  out = run_script("evaluate.py", "--checkpoint", tmp_path / "run", "--split", "test", "--max-examples", "8")
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = json.loads(out.stdout.splitlines()[0])
  assert metrics["num_examples"] == 8 and len(metrics["samples"]) == 5
  # Only the answer ("great"/"other") and the end-of-turn token are targets: 2 per example.
  assert metrics["num_tokens"] == 2 * 8
  # The exact match is transformers' generate's on the exported model: the same answers, token for token.
  run_cfg = config.load(tmp_path / "run" / "config.yaml")
  module = transformers.LlamaForCausalLM.from_pretrained(export_run(tmp_path / "run", "latest", tmp_path / "hf"))
  rows = text.with_prompts(splits.load_raw(run_cfg.data, run_cfg.train.seed, ["test"], limit=8)["test"], run_cfg,
                           "test")
  want = torch_ref.exact_match(module.eval(), pretrained.load_tokenizer(run_cfg.model), run_cfg, rows)
  assert (metrics["exact_match"], metrics["samples"]) == (want["exact_match"], want["samples"])


def test_loss_is_the_mean_over_target_tokens_and_ignores_masked_targets(tiny_llama_dir):
  mesh = sharding.make_mesh(MeshConfig())
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tiny_llama_dir), new_params=()), 0, mesh, 0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 1000, (2, 12)).astype(np.int32)
  mask = np.zeros((2, 12), np.float32)
  mask[0, 2:11] = 1  # 9 targets in row 0, 2 in row 1
  mask[1, 5:7] = 1
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "segment_ids": np.ones_like(ids),
           "positions": np.tile(np.arange(12, dtype=np.int32), (2, 1)), "loss_mask": mask}
  loss, logits = steps.loss_fn(model, LM, params, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.float32, None)
  logp = np.asarray(logits) - np.log(np.exp(np.asarray(logits, np.float64)).sum(-1, keepdims=True))
  token_loss = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  want = (token_loss * mask).sum() / mask.sum()
  per_row_mean = np.mean([(token_loss[r] * mask[r]).sum() / mask[r].sum() for r in range(2)])
  assert float(loss) == pytest.approx(want, rel=1e-5) and abs(want - per_row_mean) > 1e-3
  changed = dict(batch, targets=np.where(mask > 0, batch["targets"], 7))  # only masked targets change
  loss2, _ = steps.loss_fn(model, LM, params, {k: jnp.asarray(v) for k, v in changed.items()}, jnp.float32, None)
  assert float(loss2) == float(loss)


def test_task_and_model_kind_must_agree(tmp_path, tiny_llama_dir, reviews):
  path = lm_config(tmp_path, tiny_llama_dir, reviews, text_column="review")
  raw = yaml.safe_load(path.read_text())
  raw["task"] = "classification"
  raw["data"] = {**raw["data"], "label_column": "score"}
  path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "generate"}))
  with pytest.raises(UserError, match="is a llama decoder, but task classification needs an encoder model"):
    loop.fit(config.load(path), tmp_path / "run")
