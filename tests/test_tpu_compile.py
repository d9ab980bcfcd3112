"""The train steps of the three model kinds compile for a TPU slice (v5e:2x2, compile-only devices on this host)
with model.attention: auto, which on TPUs is Pallas splash attention: its kernel is in the program, and at 4096
tokens no device holds a heads x L x L score buffer (XLA's attention does).

Dropout is off (model.dropout: 0): auto keeps attention dropout, and so XLA's attention, where a checkpoint has
it. T5's relative position bias is an additive bias splash does not take, so the encoder-decoder is BART; planning
needs only its config.json, so it comes from transformers' BartConfig, no weights saved.
"""

from __future__ import annotations

import json

import pytest
import yaml

from jaxtune import config, sharding
from jaxtune.tools import plan

pytest.importorskip("libtpu", reason="TPU compiles need libtpu: pip install 'jaxtune[tpu-compile]'")

TOPOLOGY = "v5e:2x2"
KINDS = {"encoder": ("tiny_bert_dir", "classification"), "decoder": ("tiny_llama_dir", "causal_lm"),
         "encoder-decoder": (None, "seq2seq")}
BART = {"vocab_size": 99, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "max_position_embeddings": 64}
# A decoder whose heads are as wide as the TPU's lanes, 2 scanned layers: the long-sequence case (no weights needed).
# Scanned, XLA's attention keeps each layer's float32 scores for the backward pass; unrolled it keeps less (100 MiB)
# and compiles for 3 minutes on 2 cores rather than 1.5.
LONG_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 1024,
              "max_position_embeddings": 8192, "tie_word_embeddings": True}
LONG = 4096


def make_config(tmp_path, model_path, task: str, dtype: str, attention: str = "auto", max_len: int = 64,
                batch: int = 8, scan: bool = False):
  data = {"train": "unused.csv", "max_len": max_len}
  if task == "seq2seq":
    data.update(source_column="review", target_column="score", max_target_len=16)
  path = tmp_path / f"{task}-{dtype}-{attention}.yaml"
  path.write_text(yaml.safe_dump({
      "task": task, "model": {"path": str(model_path), "compute_dtype": dtype, "attention": attention, "dropout": 0.0,
                              "scan_layers": scan},
      "data": data, "mesh": {"data": 1, "fsdp": -1}, "train": {"batch_size": batch}}))
  return config.load(path)


def compile_for_slice(cfg, hf_config):
  """(model, compiled train step) of `cfg` on the v5e:2x2 slice, through plan.py's lowering."""
  mesh = sharding.make_mesh(cfg.mesh, plan.tpu_target(TOPOLOGY).devices)
  model, _, lowered = plan.lower_train_step(cfg, hf_config, mesh)
  return model, lowered.compile()


# Every kind in float32 (the dtype that once failed to compile for TPU); bfloat16 for the decoder, the encoder's and
# the encoder-decoder's bfloat16 compiles slow-tier (the same kernels, the same lowering of the other dtype).
SLOW_BF16 = lambda kind, dtype: dtype == "bfloat16" and kind != "decoder"


@pytest.fixture(scope="module", params=[pytest.param((k, d), marks=pytest.mark.slow if SLOW_BF16(k, d) else ())
                                        for k in KINDS for d in ("float32", "bfloat16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def compiled_kind(request, tmp_path_factory):
  kind, dtype = request.param
  fixture, task = KINDS[kind]
  if fixture is None:
    import transformers

    model_dir, hf_config = "unused-model-dir", transformers.BartConfig(**BART).to_dict()
  else:
    model_dir = request.getfixturevalue(fixture)
    hf_config = json.loads((model_dir / "config.json").read_text())
  cfg = make_config(tmp_path_factory.mktemp("tpu_compile"), model_dir, task, dtype)
  return kind, compile_for_slice(cfg, hf_config)[1]


def test_train_step_compiles_with_splash_attention(compiled_kind):
  kind, compiled = compiled_kind
  text = compiled.as_text()
  calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
  assert calls, f"{kind}: no Pallas kernel (tpu_custom_call) in the compiled TPU step"
  assert any("splash" in line.lower() for line in calls), f"{kind}: no splash attention kernel among {len(calls)} calls"


@pytest.fixture(scope="module")
def long_temps(tmp_path_factory):
  """XLA temp bytes per device of the 4096-token decoder step (1 row per device) under auto and xla attention."""
  tmp = tmp_path_factory.mktemp("long")
  out = {}
  for attention in ("auto", "xla"):
    cfg = make_config(tmp, "unused-model-dir", "causal_lm", "bfloat16", attention, max_len=LONG, batch=4, scan=True)
    out[attention] = compile_for_slice(cfg, LONG_LLAMA)[1].memory_analysis().temp_size_in_bytes
  return out


# slow-tier: two 4096-token TPU compiles (~145 s); test_train_step_compiles_with_splash_attention shows the kernel
@pytest.mark.slow
def test_long_sequences_hold_no_score_matrix(long_temps):
  """One layer's heads x L x L float32 scores on one device are 128 MiB here: XLA's attention keeps them for the
  backward pass (measured: 457 MiB of temporaries), splash never builds them (100 MiB, all else)."""
  scores = LONG_LLAMA["num_attention_heads"] * LONG * LONG * 4
  assert long_temps["xla"] >= scores, long_temps
  assert long_temps["auto"] < scores, long_temps
  assert long_temps["auto"] * 4 < long_temps["xla"], long_temps
