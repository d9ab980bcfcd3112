"""Gemma 2 and Gemma 3 text checkpoints (model_type gemma2, gemma3_text) as the Llama decoder with Gemma's flags.

llama.LlamaLM runs them: `LlamaConfig.gemma` scales the embeddings by sqrt(D), makes every RMSNorm x * (1 + w) and
norms each sublayer's output before its residual add (HF's post_attention and post_feedforward norms); the MLP is
llama.MLP with gelu_pytorch_tanh (GeGLU). Attention is scaled by query_pre_attn_scalar**-0.5; layer_types says
which layers are local (sliding window) and which global; Gemma 2 soft-caps the attention scores and the logits;
Gemma 3 norms each head's queries and keys and gives its local layers their own rope base, scaling only the
global layers' rope. This module reads those from transformers' config (v4 and v5 layouts) and maps the
checkpoint's keys. Gemma 3's multimodal checkpoints (model_type gemma3) are not read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune.errors import UserError
from jaxtune.models import layers, llama

LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # HF's default: every n-th layer global, the others local


@dataclasses.dataclass(frozen=True)
class GemmaConfig(llama.LlamaConfig):
  """A LlamaConfig read from a Gemma 2 or Gemma 3 text config.json (no fields of its own)."""

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int = 0, dropout: float | None = None,
              head: str = "causal_lm") -> GemmaConfig:
    """Our config from an HF gemma2 / gemma3_text config.json (transformers v4 or v5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in DEFAULT_PATTERN:
      raise UserError(f"model_type {model_type!r} is not a Gemma text model; jaxtune's gemma module reads "
                      f"{sorted(DEFAULT_PATTERN)}.")
    if hf.get("use_bidirectional_attention"):
      raise UserError(f"{model_type} with use_bidirectional_attention (an embedding model such as EmbeddingGemma) is "
                      "not supported: jaxtune runs Gemma as a causal LM only.")
    n, pattern = hf["num_hidden_layers"], hf.get("sliding_window_pattern") or DEFAULT_PATTERN[model_type]
    types = tuple(hf.get("layer_types") or ("sliding_attention" if (i + 1) % pattern else "full_attention"
                                            for i in range(n)))
    if len(types) != n or set(types) - set(LAYER_TYPES):
      raise UserError(f"{model_type} layer_types {list(types)} should name {n} layers, each one of {LAYER_TYPES}; "
                      "use the checkpoint's own config.json.")
    rope, local_theta = _ropes(hf, model_type)
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in layers.ACTIVATIONS:
      raise UserError(f"{model_type} hidden_activation {act!r} is not supported (only {sorted(layers.ACTIVATIONS)}).")
    llama_hf = {**hf, "rope_parameters": rope, "rope_scaling": None, "use_sliding_window": False,
                "hidden_act": act, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
    base = super().from_hf(llama_hf, num_labels, dropout, head)
    gemma2 = model_type == "gemma2"  # HF's Gemma2Config defaults to both soft caps; Gemma 3 to neither
    return dataclasses.replace(
        base, gemma=True, sliding_window=hf.get("sliding_window", 4096), layer_types=types,
        qk_norm=not gemma2, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        # transformers' Gemma 3 attention never passes attn_logit_softcapping on, whatever the config says
        attn_logit_softcapping=_float(hf.get("attn_logit_softcapping", 50.0)) if gemma2 else None,
        final_logit_softcapping=_float(hf.get("final_logit_softcapping", 30.0 if gemma2 else None)),
        rope_local_theta=local_theta)


def _float(x: Any) -> float | None:
  return None if x is None else float(x)


def _ropes(hf: dict[str, Any], model_type: str) -> tuple[dict[str, Any], float | None]:
  """(the rope parameters every layer uses, or Gemma 3's global layers; Gemma 3's local layers' rope base)."""
  rope = dict(hf.get("rope_parameters") or {})
  if model_type == "gemma2":
    rope.update(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope, None
  if "full_attention" in rope or "sliding_attention" in rope:  # transformers v5: one rope per layer type
    local, rope = dict(rope.get("sliding_attention") or {}), dict(rope.get("full_attention") or {})
  else:  # transformers v4: rope_theta and rope_scaling for the global layers, rope_local_base_freq for the local
    local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    rope.update(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
  kind = local.get("rope_type", local.get("type", "default"))
  if kind != "default":
    raise UserError(f"gemma3_text rope type {kind!r} on the sliding layers is not supported (only 'default' there; "
                    "the global layers take 'linear' or 'llama3').")
  rope.setdefault("rope_theta", 1_000_000.0)
  return rope, float(local.get("rope_theta", 10000.0))


def hf_param_map(cfg: llama.LlamaConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF Gemma2ForCausalLM / Gemma3ForCausalLM key, layout kind): Llama's, and four norms a block."""
  m = llama.hf_param_map(cfg)
  theirs = "model.layers.{i}"  # stacked: {i} runs over the N layers
  m["layers.attn_out_norm.scale"] = (f"{theirs}.post_attention_layernorm.weight", "copy")
  m["layers.mlp_norm.scale"] = (f"{theirs}.pre_feedforward_layernorm.weight", "copy")
  m["layers.mlp_out_norm.scale"] = (f"{theirs}.post_feedforward_layernorm.weight", "copy")
  return m
