"""GPT-2 and the Llama family against transformers' PyTorch classes on tiny random checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.generation import decoder, search
from jaxtune.models.llama import LlamaConfig, rope_frequencies, sliding_layers
from jaxtune.weights import pretrained

MESH = sharding.make_mesh(MeshConfig())
BASE = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# Gemma: larger weights so that soft caps of a few units bite; a window of 5 < the 24 tokens; 2 layers: local, global
GEMMA = dict(BASE, head_dim=8, query_pre_attn_scalar=16, sliding_window=5, initializer_range=0.3)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}
PHI3 = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's own ids (32000 on) lie past the vocab
EXPERTS = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)  # top-2, aux loss on
CASES = {
    "llama_gqa_untied": (transformers.LlamaConfig(**BASE), transformers.LlamaForCausalLM),
    "llama_tied": (transformers.LlamaConfig(**BASE, tie_word_embeddings=True), transformers.LlamaForCausalLM),
    "llama3_rope_biases": (transformers.LlamaConfig(**BASE, rope_scaling=LLAMA3_ROPE, attention_bias=True,
                                                    mlp_bias=True, rope_theta=500000.0), transformers.LlamaForCausalLM),
    "qwen2_qkv_bias": (transformers.Qwen2Config(**BASE), transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig(**BASE), transformers.MistralForCausalLM),
    "mistral_sliding_window": (transformers.MistralConfig(**BASE, sliding_window=7), transformers.MistralForCausalLM),
    "qwen2_sliding_window": (transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=7,
                                                      max_window_layers=0), transformers.Qwen2ForCausalLM),
    "qwen3_qk_norm": (transformers.Qwen3Config(**BASE, head_dim=8), transformers.Qwen3ForCausalLM),
    # the window on the layers from max_window_layers on only: layer 0 full, layer 1 sliding
    "qwen2_mixed_windows": (transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=7,
                                                     max_window_layers=1), transformers.Qwen2ForCausalLM),
    "gemma2_soft_caps": (transformers.Gemma2Config(**GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=8.0),
                         transformers.Gemma2ForCausalLM),
    # q/k norms; the local layer's own rope base, linear rope scaling on the global layer only
    "gemma3_text": (transformers.Gemma3TextConfig(**GEMMA, layer_types=["sliding_attention", "full_attention"],
                                                  rope_scaling={"rope_type": "linear", "factor": 4.0}),
                    transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config(**BASE, **PHI3), transformers.Phi3ForCausalLM),  # fused qkv_proj, gate_up_proj
    "phi3_sliding_window": (transformers.Phi3Config(**BASE, **PHI3, sliding_window=7), transformers.Phi3ForCausalLM),
    # Phi-4-mini's layout: rotary on 6 of each head's 8 dims, longrope (its long factors past 8 positions), tied
    "phi4_mini_longrope": (transformers.Phi3Config(**BASE, **PHI3, partial_rotary_factor=0.75, tie_word_embeddings=True,
                                                   original_max_position_embeddings=8, rope_parameters={
                                                       "rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0],
                                                       "long_factor": [1.5, 3.0, 7.0]}), transformers.Phi3ForCausalLM),
    # 4 experts of width 16 (4 x fsdp, 2 x tensor in tests/test_family_meshes.py); the top 2 weights as they come
    "qwen3_moe": (transformers.Qwen3MoeConfig(**BASE, **EXPERTS, head_dim=8, num_experts=4, moe_intermediate_size=16,
                                              norm_topk_prob=False), transformers.Qwen3MoeForCausalLM),
    # the top 2 renormalised; 16 wide: transformers' CPU grouped matmul wants rows of a multiple of 16 bytes
    "mixtral": (transformers.MixtralConfig(**dict(BASE, intermediate_size=16), **EXPERTS, num_local_experts=4),
                transformers.MixtralForCausalLM),
    "gpt2": (transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             transformers.GPT2LMHeadModel),
    # the 1/(layer+1) attention scale is the one per-layer difference inside the scanned stack
    "gpt2_scale_by_layer": (transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                    scale_attn_by_inverse_layer_idx=True, initializer_range=0.5),
                            transformers.GPT2LMHeadModel),
}


def save(tmp_path, hf_config, cls, seed=0):
  torch.manual_seed(seed)
  model = cls(hf_config).eval()
  with torch.no_grad():  # RMSNorm weights off their init (Gemma's 0, Llama's 1): a norm read as w vs 1 + w shows
    for name, w in model.named_parameters():
      if name.endswith("norm.weight"):
        w.add_(torch.randn(w.shape) * 0.3)
  model.save_pretrained(tmp_path)
  return model


def batch_for(ids, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask), "positions": jnp.asarray(pos)}


# The mixtures of experts change the MLP, not the attention: their cases run on `auto` alone.
MLP_ONLY = {"qwen3_moe", "mixtral"}


@pytest.mark.parametrize(("case", "attention"), [(c, a) for a in ("auto", "reference", "splash")  # splash: interpreted
                                                 for c in CASES if a == "auto" or c not in MLP_ONLY])
def test_logits_match_transformers(tmp_path, case, attention):
  hf_config, cls = CASES[case]
  ref = save(tmp_path, hf_config, cls)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=(), attention=attention), 0,
                                             MESH, 0)
  ids = np.random.default_rng(0).integers(0, 99, (3, 24))
  mask = np.ones_like(ids)
  mask[1, 15:] = 0  # right padding in the batch
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  got = np.asarray(model.apply(params, batch_for(ids, mask))["logits"])
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() <= 1e-4


def test_llama3_rope_scaling_is_really_applied():
  plain = LlamaConfig.from_hf({**transformers.LlamaConfig(**BASE).to_dict()})
  scaled = LlamaConfig.from_hf({**CASES["llama3_rope_biases"][0].to_dict()})
  assert scaled.rope_scaling and not np.allclose(rope_frequencies(plain), rope_frequencies(scaled))


@pytest.mark.parametrize("case", ["llama_gqa_untied", "gpt2"])
def test_causal_a_future_token_never_changes_earlier_logits(tmp_path, case):
  hf_config, cls = CASES[case]
  save(tmp_path, hf_config, cls)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=()), 0, MESH, 0)
  ids = np.random.default_rng(1).integers(0, 99, (1, 16))
  changed = ids.copy()
  changed[0, 10] = (ids[0, 10] + 1) % 99
  mask = np.ones_like(ids)
  a = np.asarray(model.apply(params, batch_for(ids, mask))["logits"])
  b = np.asarray(model.apply(params, batch_for(changed, mask))["logits"])
  np.testing.assert_array_equal(a[0, :10], b[0, :10])
  assert not np.allclose(a[0, 10:], b[0, 10:])


@pytest.mark.parametrize("case", ["qwen2_qkv_bias", "gpt2"])
def test_packed_documents_do_not_see_each_other(tmp_path, case):
  """Two documents packed in one row give the logits each gives alone."""
  hf_config, cls = CASES[case]
  save(tmp_path, hf_config, cls)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=()), 0, MESH, 0)
  rng = np.random.default_rng(2)
  doc_a, doc_b = rng.integers(0, 99, 9), rng.integers(0, 99, 7)
  packed = {"input_ids": jnp.asarray(np.concatenate([doc_a, doc_b])[None]),
            "segment_ids": jnp.asarray(np.array([1] * 9 + [2] * 7)[None]),
            "positions": jnp.asarray(np.concatenate([np.arange(9), np.arange(7)])[None])}
  together = np.asarray(model.apply(params, packed)["logits"])[0]
  alone = lambda doc: np.asarray(model.apply(params, batch_for(doc[None], np.ones((1, len(doc)), int)))["logits"])[0]
  np.testing.assert_allclose(together[:9], alone(doc_a), atol=1e-5)
  np.testing.assert_allclose(together[9:], alone(doc_b), atol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_qk_norm", "qwen2_sliding_window", "phi3", "phi3_sliding_window",
                                  "qwen2_mixed_windows", "gemma2_soft_caps", "gemma3_text", "qwen3_moe"])
def test_greedy_generation_equals_transformers_generate(tmp_path, case):
  """Token for token, from ragged prompts, the newer families against transformers' own greedy `generate`."""
  hf_config, cls = CASES[case]
  ref = save(tmp_path, hf_config, cls)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=()), 0, MESH, 0)
  rng = np.random.default_rng(3)
  for prompt in (rng.integers(1, 99, 5), rng.integers(1, 99, 12)):  # 12 + 10 tokens pass the windows of 5 and 7
    ours = decoder.generate(model, params, [prompt], eos_ids=[-1], s=search.Search(max_new_tokens=10))[0]
    with torch.no_grad():
      theirs = ref.generate(torch.from_numpy(prompt[None]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_sliding_windows_on_some_layers_are_kept_per_layer():
  mixed = LlamaConfig.from_hf(CASES["qwen2_mixed_windows"][0].to_dict())
  assert (mixed.sliding_window, mixed.layer_types) == (7, ("full_attention", "sliding_attention"))
  assert np.array_equal(sliding_layers(mixed), [False, True])
  every = LlamaConfig.from_hf(CASES["qwen2_sliding_window"][0].to_dict())  # one window for all: no per-layer flags
  assert (every.sliding_window, every.layer_types, sliding_layers(every)) == (7, None, None)
  none = LlamaConfig.from_hf(transformers.Qwen2Config(**BASE).to_dict())
  assert (none.sliding_window, none.layer_types) == (None, None)


def test_longrope_takes_the_short_factors_up_to_the_original_length_and_the_long_ones_past_it(tmp_path):
  """transformers picks the set per forward call by max(position_ids) + 1 > original_max_position_embeddings (8)."""
  hf_config, cls = CASES["phi4_mini_longrope"]
  ref = save(tmp_path, hf_config, cls)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=()), 0, MESH, 0)
  short, long = (rope_frequencies(model.cfg, jnp.arange(n)[None]) for n in (8, 9))
  assert short.shape == (3,) and not np.allclose(short, long)  # 3 frequencies: 6 rotary dims of 8
  for length in (8, 9):
    ids = np.random.default_rng(4).integers(0, 99, (2, length))
    with torch.no_grad():
      want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(model.apply(params, batch_for(ids, np.ones_like(ids)))["logits"])
    assert np.abs(got - want).max() <= 1e-4, length


def test_unsupported_rope_types_are_refused_naming_the_supported_ones():
  yarn = transformers.LlamaConfig(**BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0}).to_dict()
  with pytest.raises(UserError, match=r"rope type 'yarn' is not supported \(only \('default', 'linear', 'llama3', "
                                      r"'longrope'\)\)"):
    LlamaConfig.from_hf(yarn)


def test_phi3_dropout_on_residuals_or_embeddings_is_refused():
  hf = transformers.Phi3Config(**BASE, **PHI3, resid_pdrop=0.1).to_dict()
  with pytest.raises(UserError, match="sets resid_pdrop 0.1, embd_pdrop 0.0, but jaxtune's Phi-3 has dropout on the "
                                      "attention probabilities only"):
    LlamaConfig.from_hf(hf)
  assert LlamaConfig.from_hf(CASES["phi3_sliding_window"][0].to_dict()).sliding_window == 7
