"""Encoder-decoder models against transformers' PyTorch classes on tiny random checkpoints, padding in the
source and the target batch: encoder outputs and decoder logits; the cached decoding path against the full one;
the checkpoint keys loaded and exported."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.models import FAMILIES
from jaxtune.weights import export, pretrained

MESH = sharding.make_mesh(MeshConfig())
T5 = {"vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_decoder_layers": 3,
      "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12}
BART = {"vocab_size": 99, "d_model": 32, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "max_position_embeddings": 64}
# OPUS-MT: swish, scaled embeddings, and the last token of the vocabulary both pads and starts the decoder
MARIAN = {**BART, "activation_function": "swish", "scale_embedding": True, "pad_token_id": 98,
          "decoder_start_token_id": 98, "eos_token_id": 0}
CASES = {
    "t5_v1.0": (transformers.T5Config(**T5, feed_forward_proj="relu", tie_word_embeddings=True),
                transformers.T5ForConditionalGeneration),
    # transformers 5 ties every T5 head; tie_word_embeddings=False only turns the v1.0 rescale off
    "t5_v1.1": (transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                transformers.T5ForConditionalGeneration),
    "bart": (transformers.BartConfig(**BART), transformers.BartForConditionalGeneration),
    # untied, transformers 5 ties nothing: each stack reads its own embed_tokens, the head its own matrix
    "bart_untied": (transformers.BartConfig(**BART, tie_word_embeddings=False),
                    transformers.BartForConditionalGeneration),
    "marian": (transformers.MarianConfig(**MARIAN), transformers.MarianMTModel),
    # a target vocabulary of its own (the decoder's table doubles as the head)
    "marian_two_vocabs": (transformers.MarianConfig(**MARIAN, share_encoder_decoder_embeddings=False,
                                                    decoder_vocab_size=111), transformers.MarianMTModel),
}
BART_STYLE = [c for c in CASES if not c.startswith("t5")]


def randomize(model: torch.nn.Module) -> None:
  """Random values where transformers initialises constants (biases, norm scales, BART's and Marian's
  final_logits_bias), so that a missing or swapped one shows."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for _, t in [*model.named_parameters(), *model.named_buffers()]:
      if t.is_floating_point() and t.numel() > 1 and bool(torch.all(t == t.flatten()[0])):
        t.add_(torch.randn(t.shape, generator=g) * 0.5)


def save_untied(model, path) -> None:
  """A v1.1 checkpoint as T5 v1.1 / Flan-T5 ship: lm_head.weight its own matrix, tie_word_embeddings false."""
  model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
  config = {**model.config.to_dict(), "tie_word_embeddings": False}
  config.pop("scale_decoder_outputs", None)
  (path / "config.json").write_text(json.dumps(config))
  state = {k: v.contiguous().numpy() for k, v in model.state_dict().items() if "embed_tokens" not in k}
  save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def source_model(case: str, path) -> torch.nn.Module:
  """The case's random transformers model, saved to `path` (save_pretrained, or as untied v1.1 T5 ships)."""
  hf_config, cls = CASES[case.removesuffix("_shipped")]
  torch.manual_seed(0)
  source = cls(hf_config).eval()
  randomize(source)
  if case.endswith("_shipped"):
    save_untied(source, path)
  else:
    source.save_pretrained(path)
  return source


def load(path, attention="auto"):
  return pretrained.from_pretrained(ModelConfig(path=str(path), new_params=(), attention=attention), 0, MESH, 0)


def batch(cfg, pad: int):
  """Source 3 x 14 and target 3 x 9, each right-padded in two rows (long enough for the log-spaced buckets)."""
  rng = np.random.default_rng(0)
  target_vocab = getattr(cfg, "decoder_vocab_size", None) or cfg.vocab_size
  src, tgt = rng.integers(3, cfg.vocab_size - 1, (3, 14)), rng.integers(3, target_vocab - 1, (3, 9))
  src_mask, tgt_mask = np.ones_like(src), np.ones_like(tgt)
  src_mask[1, 9:] = src_mask[2, 4:] = 0
  tgt_mask[0, 6:] = tgt_mask[2, 2:] = 0
  src[src_mask == 0], tgt[tgt_mask == 0] = pad, pad
  return {"input_ids": src, "attention_mask": src_mask, "decoder_input_ids": tgt, "decoder_attention_mask": tgt_mask}


# Interpreted splash (~12 s a case on CPU) runs for T5 (its bias: XLA's ops) and BART in CI; Marian and the untied
# BART share BART's attention masks and are slow-tier under it.
SPLASH_SLOW = {"marian", "marian_two_vocabs", "bart_untied"}
LOGIT_CASES = [pytest.param(case, attention, marks=pytest.mark.slow) if attention == "splash" and case in SPLASH_SLOW
               else (case, attention)  # T5's position bias: XLA's ops under splash
               for attention in ("auto", "reference", "splash") for case in [*CASES, "t5_v1.1_shipped"]]


@pytest.mark.parametrize(("case", "attention"), LOGIT_CASES)
def test_encoder_outputs_and_decoder_logits_match_transformers(case, tmp_path, attention):
  source = source_model(case, tmp_path)
  model, params = load(tmp_path, attention)
  hf_config = source.config
  inputs = batch(hf_config, hf_config.pad_token_id)
  got = model.apply(params, {k: jnp.asarray(v) for k, v in inputs.items()})
  with torch.no_grad():
    want = source(**{k: torch.from_numpy(v) for k, v in inputs.items()})
  src, tgt = inputs["attention_mask"].astype(bool), inputs["decoder_attention_mask"].astype(bool)
  assert np.abs(np.asarray(got["hidden"]) - want.encoder_last_hidden_state.numpy())[src].max() <= 1e-4
  assert np.abs(np.asarray(got["logits"]) - want.logits.numpy())[tgt].max() <= 1e-4


@pytest.mark.slow  # CI time: test_seq2seq_generate checks cached against uncached greedy decoding per family
@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_matches_full_decoding(case, tmp_path):
  """init_cache + decode_step over the target (a two-token chunk, then one token at a time, in more slots than
  it needs) give the logits of `decode` on the whole target. Run eagerly: the ops' shapes repeat across cases and
  steps, which costs less than compiling each case."""
  source = source_model(case, tmp_path)
  model, params = load(tmp_path)
  inputs = {k: jnp.asarray(v) for k, v in batch(source.config, source.config.pad_token_id).items()}
  ids_BxT = inputs.pop("decoder_input_ids")
  del inputs["decoder_attention_mask"]  # the cache has no target mask: every position is compared
  memory = model.apply(params, inputs, jnp.float32, method="encode")
  full = np.asarray(model.apply(params, {**inputs, "decoder_input_ids": ids_BxT}, memory, jnp.float32, method="decode"))
  cache = model.apply(params, memory, inputs["attention_mask"], ids_BxT.shape[1] + 2, jnp.float32, method="init_cache")
  t = ids_BxT.shape[1]
  got = []
  for start, stop in zip([0, *range(2, t)], range(2, t + 1)):
    logits, cache = model.apply(params, ids_BxT[:, start:stop], cache, jnp.float32, method="decode_step")
    got.append(np.asarray(logits))
  assert int(cache.length) == t
  # Logits up to ~14: float32 rounding of the two orders of summation reaches ~1e-5 (11 ulp) on the largest.
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", BART_STYLE)
def test_checkpoints_with_every_key_load_and_export_round_trips(case, tmp_path):
  """A checkpoint holding the whole state dict (tied copies, Marian's fixed position tables, as older hub
  checkpoints do) loads the same params as save_pretrained's; export writes save_pretrained's keys and values
  (but an untied model.shared, which nothing reads)."""
  source = source_model(case, tmp_path / "saved")
  model, params = load(tmp_path / "saved")
  full = tmp_path / "full"
  full.mkdir()
  (full / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
  save_file({k: v.contiguous().numpy() for k, v in source.state_dict().items()}, full / "model.safetensors",
            metadata={"format": "pt"})
  _, again = load(full)
  flat, flat_again = params_lib.flatten(params), params_lib.flatten(again)
  assert set(flat) == set(flat_again)
  for path, array in flat.items():
    np.testing.assert_array_equal(np.asarray(array), np.asarray(flat_again[path]), err_msg=path)
  tensors = export.hf_tensors(model, {p: np.asarray(a) for p, a in flat.items()})
  with safe_open(tmp_path / "saved" / "model.safetensors", "np") as f:
    saved = {k: f.get_tensor(k) for k in f.keys()}
  unread = params_lib.matcher(FAMILIES[model.family].ignored_keys(model.cfg))
  assert set(tensors) == {k for k in saved if not unread(k)}
  for key, array in tensors.items():
    np.testing.assert_array_equal(array, saved[key], err_msg=key)
