"""What Phi-3 (and Phi-4-mini) add to the Llama family: fused checkpoint tensors and the longrope rotary embedding.

Phi-3's checkpoint fuses q, k and v into one self_attn.qkv_proj ((H + 2G) x K rows: q's, then k's, then v's) and
gate and up into one mlp.gate_up_proj (2F rows: gate's, then up's). Our params stay separate, so LoRA targets, the
sharding rules and the fused matmuls are Llama's; each maps to its rows of the fused tensor (the KIND[a:b] layout
kinds of weights/hf.py), which the loader reads slice by slice and export concatenates back.
Dimensions: B batch, L length, H query heads, G kv heads, K head dim, F mlp dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxtune.errors import UserError

if TYPE_CHECKING:
  from jaxtune.models.llama import LlamaConfig

ORIGINAL_MAX_POSITIONS = 4096  # Phi3Config's original_max_position_embeddings when config.json leaves it out


def fused_param_map(param_map: dict[str, tuple[str, str]], cfg: LlamaConfig) -> dict[str, tuple[str, str]]:
  """Llama's param map with q, k, v and gate, up each mapped to its rows of Phi-3's qkv_proj and gate_up_proj."""
  q, kv, f = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
  qkv, gate_up = "model.layers.{i}.self_attn.qkv_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight"
  rows = {"attn.q": (qkv, 0, q), "attn.k": (qkv, q, q + kv), "attn.v": (qkv, q + kv, q + 2 * kv),
          "mlp.gate": (gate_up, 0, f), "mlp.up": (gate_up, f, 2 * f)}
  return {**param_map, **{f"layers.{name}.kernel": (key, f"linear[{a}:{b}]") for name, (key, a, b) in rows.items()}}


def read_config(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
  """Phi-3's rope params as Phi3Config reads them (types su and yarn are longrope, whose pretraining length is the
  config's top-level original_max_position_embeddings), after refusing the dropouts the Llama blocks lack."""
  drops = {k: hf.get(k) or 0.0 for k in ("resid_pdrop", "embd_pdrop")}
  if any(drops.values()):
    raise UserError(f"config.json sets {', '.join(f'{k} {v}' for k, v in drops.items())}, but jaxtune's Phi-3 has "
                    "dropout on the attention probabilities only (model.dropout); set both to 0.0 in config.json, as "
                    "the released Phi-3 checkpoints do.")
  if rope.get("rope_type", rope.get("type")) not in ("su", "yarn", "longrope"):
    return rope
  rope = {k: v for k, v in rope.items() if k != "type"}
  return {**rope, "rope_type": "longrope",
          "original_max_position_embeddings": hf.get("original_max_position_embeddings", ORIGINAL_MAX_POSITIONS)}


def longrope(inv_freq: jax.Array, scaling: dict[str, Any], positions_BxL: jax.Array | None) -> jax.Array:
  """Inverse frequencies divided by longrope's per-frequency factors: the long ones when the call's furthest position
  passes the pretraining length, else the short ones (HF picks them per forward call, by max(position_ids) + 1)."""
  short = jnp.asarray(scaling["short_factor"], jnp.float32)
  if positions_BxL is None:
    return inv_freq / short
  longer = jnp.max(positions_BxL) + 1 > scaling["original_max_position_embeddings"]
  return inv_freq / jnp.where(longer, jnp.asarray(scaling["long_factor"], jnp.float32), short)


def attention_factor(cfg: LlamaConfig) -> float:
  """What the rotary embedding multiplies cos and sin by: longrope's attention_factor (HF's default
  sqrt(1 + ln s / ln L0) for the extension s = L / L0 > 1), 1 for every other rope type."""
  scaling = dict(cfg.rope_scaling or ())
  if scaling.get("rope_type") != "longrope":
    return 1.0
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  old = scaling["original_max_position_embeddings"]
  factor = scaling.get("factor")
  factor = cfg.max_position_embeddings / old if factor is None else factor
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
