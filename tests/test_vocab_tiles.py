"""The vocabulary-tiled cross-entropy (models/vocab.py) against the plain one: loss and every gradient within 1e-6
in float32 on tiny decoders and encoder-decoders (tied and untied heads, T5's rescale, BART's final_logits_bias,
a LoRA adapter on the head, Gemma 2's soft cap), and the compiled train step's temporaries at Llama 3's vocabulary
and 4096 tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig
from jaxtune.models import vocab
from jaxtune.tasks import TASKS
from jaxtune.train import optim, steps
from jaxtune.weights import pretrained

MESH = sharding.make_mesh(MeshConfig())
LLAMA = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
SEQ2SEQ = {"d_model": 32, "num_heads": 4, "relative_attention_num_buckets": 8, "vocab_size": 99}
BART = {"vocab_size": 99, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "max_position_embeddings": 64}
CASES = {
    "llama_untied": (transformers.LlamaConfig(**LLAMA), transformers.LlamaForCausalLM),
    "llama_tied": (transformers.LlamaConfig(**LLAMA, tie_word_embeddings=True), transformers.LlamaForCausalLM),
    "gpt2": (transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             transformers.GPT2LMHeadModel),
    # logits of about +-0.3 soft-capped at 0.2: each block's capped logits and the cap's derivative in backward
    "gemma2_soft_cap": (transformers.Gemma2Config(**LLAMA, head_dim=8, final_logit_softcapping=0.2),
                        transformers.Gemma2ForCausalLM),
    "t5_tied_rescaled": (transformers.T5Config(**SEQ2SEQ, d_kv=8, d_ff=37, num_layers=2, feed_forward_proj="relu",
                                               tie_word_embeddings=True), transformers.T5ForConditionalGeneration),
    "bart_logits_bias": (transformers.BartConfig(**BART), transformers.BartForConditionalGeneration),
    "marian_two_vocabs": (transformers.MarianConfig(**BART, pad_token_id=98, decoder_start_token_id=98,
                                                    share_encoder_decoder_embeddings=False, decoder_vocab_size=111),
                          transformers.MarianMTModel),
}


def load(case, tmp_path, lora=None):
  hf_config, cls = CASES[case]
  torch.manual_seed(0)
  source = cls(hf_config)
  with torch.no_grad():  # BART's final_logits_bias is zeros as saved: make a wrong or missing one show
    for name, t in source.named_buffers():
      if "final_logits_bias" in name:
        t.add_(torch.randn(t.shape) * 0.5)
  source.save_pretrained(tmp_path)
  return pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=(), lora=lora or LoraConfig()), 0,
                                    MESH, 0)


def batch_for(model, task):
  rng = np.random.default_rng(0)
  mask = np.ones((2, 9), np.float32)
  mask[1, 5:] = 0
  if task == "causal_lm":
    ids = rng.integers(0, 99, (2, 9)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "segment_ids": np.ones_like(ids),
             "positions": np.tile(np.arange(9, dtype=np.int32), (2, 1)), "loss_mask": mask}
  else:
    target_vocab = getattr(model.cfg, "target_vocab", model.cfg.vocab_size)
    batch = {"input_ids": rng.integers(3, 98, (2, 11)).astype(np.int32), "attention_mask": np.ones((2, 11), np.int32),
             "labels": rng.integers(3, target_vocab, (2, 9)).astype(np.int32), "label_mask": mask}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def loss_and_grads(model, params, frozen, task, batch, block, rng=None):
  def loss(p):
    logits = model.apply(p, batch, frozen=frozen, dropout_rng=rng, **steps.head_kwargs(task, block))["logits"]
    total, count = task.loss_terms(logits, batch)
    return total / count, logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return float(value), grads, logits


def assert_close(want, got):
  loss, grads, _ = want
  loss2, grads2, _ = got
  assert loss2 == pytest.approx(loss, rel=1e-6, abs=0)
  flat, flat2 = params_lib.flatten(grads), params_lib.flatten(grads2)
  assert flat.keys() == flat2.keys()
  overall = max(float(jnp.abs(g).max()) for g in flat.values())
  # A gradient that is zero in exact arithmetic (a key bias) is float noise in both, and a small one (T5's keys, ~1e-2
  # of the largest) takes float32 rounding of the largest's size from the vocabulary sums' other order: 1e-7 of it.
  for path, g in flat.items():
    assert float(jnp.abs(g - flat2[path]).max()) <= 1e-6 * float(jnp.abs(g).max()) + 1e-7 * overall, path


# Slow-tier: the untied Llama (llama_tied and the LoRA-head test read the same tiled head), GPT-2 (a tied table as
# llama_tied's) and BART's logit bias (marian_two_vocabs runs the same bias path with its own vocabulary)
SLOW_CASES = ("llama_untied", "gpt2", "bart_logits_bias")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_tiled_loss_and_gradients_equal_the_plain_ones(case, tmp_path):
  model, params = load(case, tmp_path)
  task = TASKS["causal_lm" if case.split("_")[0] in ("llama", "gpt2", "gemma2") else "seq2seq"]
  batch = batch_for(model, task.name)
  plain = loss_and_grads(model, params, None, task, batch, 0)
  assert not isinstance(plain[2], vocab.TiledHead)
  for block in (8, 128):  # a remainder block after a scan; one partial block only (block > V)
    tiled = loss_and_grads(model, params, None, task, batch, block)
    assert isinstance(tiled[2], vocab.TiledHead)
    assert_close(plain, tiled)


def test_lora_on_the_lm_head_folds_into_the_table_or_falls_back_to_plain_logits(tmp_path):
  lora = LoraConfig(targets=(r"lm_head\.kernel", r"layers\.attn\.q\.kernel"), rank=4)
  model, params = load("llama_untied", tmp_path, lora)
  params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)  # B != 0
  trainable, frozen = model.split(params)
  assert any("lm_head.lora_b" in p for p in params_lib.flatten(trainable))
  task, batch = TASKS["causal_lm"], batch_for(model, "causal_lm")
  plain = loss_and_grads(model, trainable, frozen, task, batch, 0)
  tiled = loss_and_grads(model, trainable, frozen, task, batch, 32)
  assert isinstance(tiled[2], vocab.TiledHead)
  assert_close(plain, tiled)
  # With adapter dropout drawing in training the head is not one table: the plain logits, explicitly.
  dropped, params = load("llama_untied", tmp_path / "d", LoraConfig(targets=(r"lm_head\.kernel",), dropout=0.1))
  out = dropped.apply(params, batch, dropout_rng=jax.random.key(0), vocab_block=32)
  assert not isinstance(out["logits"], vocab.TiledHead)


def test_default_tiles_large_vocabularies_only():
  assert vocab.block_for(128256, None) == vocab.AUTO_BLOCK and vocab.block_for(49152, None) == vocab.AUTO_BLOCK
  assert vocab.block_for(30522, None) == 0 and vocab.block_for(128256, 0) == 0 and vocab.block_for(99, 16) == 16


LONG_LLAMA = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}


def compiled_temp_bytes(vocab_block: int, hf_config=LONG_LLAMA, length: int = 4096, devices=None,
                        dtype=jnp.float32) -> int:
  """XLA's temporary bytes of the causal-LM train step (batch 1 x `length`) compiled for one device: this host's,
  or the first of `devices` (compile-only TPU devices from tools/plan.tpu_target)."""
  mesh = sharding.make_mesh(MeshConfig(data=1), (devices or jax.devices())[:1])
  model = pretrained.from_config(hf_config, ModelConfig(path="unused", new_params=()), 0, mesh, 0, "causal_lm")
  tx = optim.make(OptimConfig(), 10)
  shardings = steps.state_shardings(model, tx)
  batch_sharding = sharding.batch_sharding(mesh, sharding.RULES)
  step = steps.make_train_step(model, TASKS["causal_lm"], tx, optax.constant_schedule(1e-4), dtype, shardings,
                               batch_sharding, vocab_block=vocab_block)
  i32 = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=batch_sharding)
  batch = {"input_ids": i32, "targets": i32, "segment_ids": i32, "positions": i32,
           "loss_mask": jax.ShapeDtypeStruct((1, length), jnp.float32, sharding=batch_sharding)}
  compiled = step.lower(steps.abstract_state(model, tx, shardings), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_tiled_step_holds_no_vocabulary_sized_logits():
  """Plain: the float32 logits (1 x 4096 x 128256 x 4 bytes = 2.1 GB) and their gradient live at once; tiled:
  the N x block arrays of one block. Two CPU compiles, ~10 s (docs/memory.md has the figures)."""
  logits = 4096 * LONG_LLAMA["vocab_size"] * 4
  plain, tiled = compiled_temp_bytes(0), compiled_temp_bytes(vocab.AUTO_BLOCK)
  print(f"temp bytes: plain {plain:,}, tiled {tiled:,}")
  assert plain >= logits, plain
  assert tiled < logits // 4, tiled


if __name__ == "__main__":  # the table of docs/memory.md: python tests/test_vocab_tiles.py [v5e:2x2]
  import sys

  from jaxtune.tools import plan

  where = sys.argv[1] if len(sys.argv) > 1 else None
  devices = plan.tpu_target(where).devices if where else None
  for dtype in (jnp.float32, jnp.bfloat16):
    for block in (0, vocab.AUTO_BLOCK, 2048):
      temp = compiled_temp_bytes(block, devices=devices, dtype=dtype)
      print(f"{where or 'cpu'} {jnp.dtype(dtype).name} vocab_block={block}: temp {temp:,} bytes", flush=True)


def test_unset_the_vocabulary_is_tiled_only_where_the_logits_would_be_large():
  """train.loss_vocab_block unset: 128k vocabulary x 4096 tokens on one device (2.1 GB of float32 logits) tiles,
  x 1024 tokens (0.5 GB) stays plain; a set block tiles whatever the size, 0 never does."""
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  model = pretrained.from_config(LONG_LLAMA, ModelConfig(path="unused", new_params=()), 0, mesh, 0, "causal_lm")
  task = TASKS["causal_lm"]
  rows = lambda n: {"input_ids": np.zeros((1, n), np.int32), "loss_mask": np.zeros((1, n), np.float32)}
  assert steps.head_for(model, task, None, rows(4096), 1) == {"vocab_block": 8192}
  assert steps.head_for(model, task, None, rows(1024), 1) == {}
  assert steps.head_for(model, task, None, rows(4096), 4) == {}  # a quarter of the rows per device
  assert steps.head_for(model, task, 512, rows(16), 1) == {"vocab_block": 512}
  assert steps.head_for(model, task, 0, rows(4096), 1) == {}
