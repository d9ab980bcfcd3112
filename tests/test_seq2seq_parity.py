"""Encoder-decoder models against transformers' PyTorch classes on tiny random checkpoints, padding in the
source and the target batch: encoder outputs and decoder logits."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxtune import pretrained, sharding
from jaxtune.config import MeshConfig, ModelConfig

MESH = sharding.make_mesh(MeshConfig())
T5 = {"vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_decoder_layers": 3,
      "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12}
CASES = {
    "t5_v1.0": (transformers.T5Config(**T5, feed_forward_proj="relu", tie_word_embeddings=True),
                transformers.T5ForConditionalGeneration),
    # transformers 5 ties every T5 head; tie_word_embeddings=False only turns the v1.0 rescale off
    "t5_v1.1": (transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                transformers.T5ForConditionalGeneration),
}


def save_untied(model, path) -> None:
  """A v1.1 checkpoint as T5 v1.1 / Flan-T5 ship: lm_head.weight its own matrix, tie_word_embeddings false."""
  model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
  config = {**model.config.to_dict(), "tie_word_embeddings": False}
  config.pop("scale_decoder_outputs", None)
  (path / "config.json").write_text(json.dumps(config))
  state = {k: v.contiguous().numpy() for k, v in model.state_dict().items() if "embed_tokens" not in k}
  save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def batch(cfg, pad: int):
  """Source 3 x 14 and target 3 x 9, each right-padded in two rows (long enough for the log-spaced buckets)."""
  rng = np.random.default_rng(0)
  src, tgt = rng.integers(3, cfg.vocab_size, (3, 14)), rng.integers(3, cfg.vocab_size, (3, 9))
  src_mask, tgt_mask = np.ones_like(src), np.ones_like(tgt)
  src_mask[1, 9:] = src_mask[2, 4:] = 0
  tgt_mask[0, 6:] = tgt_mask[2, 2:] = 0
  src[src_mask == 0], tgt[tgt_mask == 0] = pad, pad
  return {"input_ids": src, "attention_mask": src_mask, "decoder_input_ids": tgt, "decoder_attention_mask": tgt_mask}


@pytest.mark.parametrize("case", [*CASES, "t5_v1.1_untied"])
def test_encoder_outputs_and_decoder_logits_match_transformers(case, tmp_path):
  hf_config, cls = CASES[case.removesuffix("_untied")]
  torch.manual_seed(0)
  source = cls(hf_config).eval()
  if case.endswith("_untied"):
    save_untied(source, tmp_path)
  else:
    source.save_pretrained(tmp_path)
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tmp_path), new_params=()), 0, MESH, 0)
  inputs = batch(hf_config, hf_config.pad_token_id)
  got = model.apply(params, {k: jnp.asarray(v) for k, v in inputs.items()})
  with torch.no_grad():
    want = source(**{k: torch.from_numpy(v) for k, v in inputs.items()})
  src, tgt = inputs["attention_mask"].astype(bool), inputs["decoder_attention_mask"].astype(bool)
  assert np.abs(np.asarray(got["hidden"]) - want.encoder_last_hidden_state.numpy())[src].max() <= 1e-4
  assert np.abs(np.asarray(got["logits"]) - want.logits.numpy())[tgt].max() <= 1e-4
