"""Registry of model families: HF `model_type` -> our config, module and checkpoint layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxtune.models import bart, encoder, gemma, gpt2, llama, moe, phi3, t5


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  config: type  # frozen dataclass with from_hf(hf config dict, num_labels, dropout, head)
  module: type  # nnx.Module class built as module(cfg, rngs=...)
  param_map: Callable[[Any], dict[str, tuple[str, str]]]  # our path -> (HF key, layout kind)
  ignored_keys: Callable[[Any], tuple[str, ...]]  # checkpoint keys that are buffers, never params
  base_prefix: str  # prefix HF task models add to the base model's keys
  kind: str  # "encoder" (classification, question answering, token classification), "decoder" (causal LM), "seq2seq"
  max_positions: Callable[[Any], int | None] = lambda cfg: None  # learned position rows; None: no hard limit


_LLAMA = ModelFamily(llama.LlamaConfig, llama.LlamaLM, llama.hf_param_map, llama.hf_ignored_keys, "model.",
                     "decoder")

# Phi-3: Llama's modules, with q, k, v and gate, up read from (and written back to) rows of its fused tensors
_PHI3 = dataclasses.replace(_LLAMA, param_map=lambda cfg: phi3.fused_param_map(llama.hf_param_map(cfg), cfg))

# Gemma 2 and Gemma 3 text: the Llama module with Gemma's flags, read and mapped by gemma.py
_GEMMA = ModelFamily(gemma.GemmaConfig, llama.LlamaLM, gemma.hf_param_map, llama.hf_ignored_keys, "model.", "decoder")


def _moe(model_type: str) -> ModelFamily:
  """Qwen3-MoE, Mixtral: Llama's module and keys with experts for the MLPs, read from that model_type's names."""
  return dataclasses.replace(_LLAMA, param_map=lambda cfg: moe.expert_param_map(llama.hf_param_map(cfg), cfg,
                                                                                 model_type))


_T5 = ModelFamily(t5.T5Config, t5.T5, t5.hf_param_map, t5.hf_ignored_keys, "", "seq2seq")

_BART = ModelFamily(bart.BartConfig, bart.Bart, bart.hf_param_map, bart.hf_ignored_keys, "model.", "seq2seq",
                    bart.max_positions)  # BART and Marian (OPUS-MT)


def _encoder(model_type: str) -> ModelFamily:
  return ModelFamily(encoder.EncoderConfig, encoder.EncoderModel, encoder.hf_param_map, encoder.hf_ignored_keys,
                     encoder.BASE_PREFIX[model_type] + ".", "encoder", encoder.max_positions)


FAMILIES: dict[str, ModelFamily] = {
    **{t: _encoder(t) for t in encoder.BASE_PREFIX},
    "gpt2": ModelFamily(gpt2.GPT2Config, gpt2.GPT2LM, gpt2.hf_param_map, gpt2.hf_ignored_keys, "transformer.",
                        "decoder", lambda cfg: cfg.n_positions),
    "llama": _LLAMA,
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "marian": _BART,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": _PHI3,
    "qwen3_moe": _moe("qwen3_moe"),
    "mixtral": _moe("mixtral"),
}
