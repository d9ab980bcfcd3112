"""The Llama family as one decoder: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, with Gemma's flags (read by gemma.py)
Gemma 2 and Gemma 3 text checkpoints, and with experts for its MLPs (moe.py) Qwen3-MoE and Mixtral.

Dimensions: N layers, B batch, L query length, S key length, D model dim, H query heads, G kv heads,
K head dim, F mlp dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import UserError
from jaxtune.models import decoding, layers, moe, phi3, vocab

SUPPORTED_ROPE = ("default", "linear", "llama3", "longrope")  # longrope: Phi-3 128k, Phi-4-mini


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted (key, value) pairs of HF rope params
  partial_rotary_factor: float = 1.0  # Phi-4-mini 0.75: rotary on the first int(K x factor) dims of each head
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
  o_bias: bool = False  # Llama with attention_bias
  mlp_bias: bool = False
  hidden_act: str = "silu"
  attention_dropout: float = 0.0  # dropout on the attention probabilities in training (HF's; usually 0)
  # Mistral, or Qwen2/3 with every layer sliding: a query sees itself and the sliding_window - 1 tokens before it
  sliding_window: int | None = None
  # Per layer, HF's "sliding_attention" (sliding_window applies) or "full_attention": Gemma, and Qwen2/3 with
  # max_window_layers; None: sliding_window (if any) on every layer
  layer_types: tuple[str, ...] | None = None
  qk_norm: bool = False  # Qwen3: an RMSNorm over each head's queries and keys before the rotary embedding
  pad_token_id: int | None = None  # its input embedding gets no gradient from the inputs (HF's padding_idx)
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code
  gemma: bool = False  # Gemma's layout: embeddings x sqrt(D), RMSNorms x (1 + w), each sublayer's output normed too
  query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar**-0.5; None: head_dim's
  attn_logit_softcapping: float | None = None  # Gemma 2: attention scores s -> tanh(s / cap) * cap
  final_logit_softcapping: float | None = None  # Gemma 2: the same on the output logits
  rope_local_theta: float | None = None  # Gemma 3: the sliding layers' own (unscaled) rope base; None: one rope
  # Qwen3-MoE, Mixtral (moe.py): each MLP is num_experts SwiGLU experts of width moe_intermediate_size, a token routed
  # to num_experts_per_tok of them; 0: the dense MLP
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1 (Mixtral's always are)
  router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss training adds where output_router_logits
  output_router_logits: bool = False  # HF's switch: the train loss includes router_aux_loss_coef x that loss

  DROPOUT_KEYS = ("attention_dropout",)  # HF config keys; model.dropout sets them all

  def __post_init__(self) -> None:  # rope_scaling and layer_types read back from JSON arrive as lists
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple((k, tuple(v) if isinstance(v, list) else v)  # longrope's
                                                     for k, v in self.rope_scaling))
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int = 0, dropout: float | None = None,
              head: str = "causal_lm") -> LlamaConfig:
    """Our config from an HF llama/mistral/qwen2/qwen3/phi3/qwen3_moe/mixtral config.json (transformers v4 or v5)."""
    del num_labels, head  # language models have no label head
    hf, experts = moe.read_config(hf)  # an MoE's config as its attention's dense family, and its expert fields
    model_type = hf.get("model_type")
    window, layer_types = hf.get("sliding_window") if model_type in ("mistral", "phi3") else None, None
    if model_type != "mistral" and hf.get("use_sliding_window"):  # Qwen2/3: the layers from max_window_layers on
      n = hf["num_hidden_layers"]
      types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", n) else
                                        "full_attention" for i in range(n)]
      window = hf["sliding_window"] if "sliding_attention" in types else None
      layer_types = tuple(types) if window and "full_attention" in types else None  # mixed: windows on some
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))  # v5: in rope
    rope = phi3.read_config(hf, rope) if model_type == "phi3" else rope
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
      raise UserError(f"rope type {kind!r} is not supported (only {SUPPORTED_ROPE}).")
    heads = hf["num_attention_heads"]
    is_qwen = model_type == "qwen2"  # q/k/v biases always; Qwen3 has none unless attention_bias
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=tuple(sorted(rope.items())) if kind != "default" else None,
        partial_rotary_factor=partial,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=is_qwen or hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False) and not is_qwen,
        mlp_bias=hf.get("mlp_bias", False), hidden_act=hf.get("hidden_act", "silu"),
        attention_dropout=float(hf.get("attention_dropout", 0.0) if dropout is None else dropout),
        pad_token_id=hf.get("pad_token_id"), sliding_window=window, layer_types=layer_types,
        qk_norm=model_type == "qwen3", **experts)


def rope_frequencies(cfg: LlamaConfig, positions_BxL: jax.Array | None = None) -> jax.Array:
  """Inverse frequencies (R/2,) of the R = int(K x partial_rotary_factor) rotary dims, with Llama 3's, linear or
  longrope scaling applied as HF does (longrope's factors picked by the call's positions)."""
  k = int(cfg.head_dim * cfg.partial_rotary_factor)  # HF rounds the rotary width down
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "linear":
    return inv_freq / scaling["factor"]
  if kind == "longrope":
    return phi3.longrope(inv_freq, scaling, positions_BxL)
  if kind == "llama3":  # long wavelengths slowed by `factor`, short kept, a smooth ramp between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(mid, smoothed, scaled)
  return inv_freq


def layer_frequencies(cfg: LlamaConfig, positions_BxL: jax.Array | None = None) -> jax.Array:
  """Inverse frequencies: (K/2,) for every layer, or N x K/2 where Gemma 3's sliding layers have their own base."""
  inv_freq = rope_frequencies(cfg, positions_BxL)
  if cfg.rope_local_theta is None:
    return inv_freq
  local = rope_frequencies(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None))
  sliding_N = jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])
  return jnp.where(sliding_N[:, None], local, inv_freq)


def sliding_layers(cfg: LlamaConfig) -> jax.Array | None:
  """Per layer (N,) whether sliding_window applies, in a stack that mixes windowed and full layers; else None."""
  if cfg.layer_types is None or cfg.sliding_window is None:
    return None
  return jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])


def apply_rope(x_BxLxNxK: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
  """Rotary embedding in HF's rotate-half layout: the first and second halves of the R = 2 len(inv_freq) rotary dims
  pair up, dims past R pass unchanged (partial rotary), cos and sin are times `scale` (longrope's attention factor)."""
  angles_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(angles_BxLxR2)[:, :, None, :] * scale, jnp.sin(angles_BxLxR2)[:, :, None, :] * scale
  x_BxLxNxK32, r = x_BxLxNxK.astype(jnp.float32), 2 * inv_freq.shape[-1]
  x1, x2 = jnp.split(x_BxLxNxK32[..., :r], 2, axis=-1)
  rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_BxLxNxK32[..., r:]]
  return jnp.concatenate(rotated, axis=-1).astype(x_BxLxNxK.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, h, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q = layers.Dense((d,), (h, k), ("embed",), ("heads", "head_dim"), rngs=rngs, use_bias=cfg.qkv_bias)
    self.k = layers.Dense((d,), (g, k), ("embed",), ("kv_heads", "head_dim"), rngs=rngs, use_bias=cfg.qkv_bias)
    self.v = layers.Dense((d,), (g, k), ("embed",), ("kv_heads", "head_dim"), rngs=rngs, use_bias=cfg.qkv_bias)
    self.o = layers.Dense((h, k), (d,), ("heads", "head_dim"), ("embed",), rngs=rngs, use_bias=cfg.o_bias)
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(k, cfg.rms_norm_eps, rngs=rngs, axis="head_dim", plus_one=cfg.gemma)
      self.k_norm = layers.RMSNorm(k, cfg.rms_norm_eps, rngs=rngs, axis="head_dim", plus_one=cfg.gemma)
    self.qk_norm, self.dropout_rate, self.window = cfg.qk_norm, cfg.attention_dropout, cfg.sliding_window
    self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    self.soft_cap = cfg.attn_logit_softcapping
    self.rope_scale = phi3.attention_factor(cfg)  # longrope's factor on cos and sin; 1 for the other rope types

  def __call__(self, x_BxLxD: jax.Array, inv_freq: jax.Array, segments: decoding.Segments,
               cache: decoding.LayerCache | None, rng: jax.Array | None, ctx: layers.Context,
               local: jax.Array | None = None) -> tuple[jax.Array, decoding.LayerCache | None]:
    """`local`: this layer's traced flag in a mixed stack (see `sliding_layers`), whether its window applies."""
    q_BxLxHxK = self.q(x_BxLxD, ctx)
    k_BxLxGxK, v_BxLxGxK = layers.dense_many((self.k, self.v), x_BxLxD, ctx)
    if self.qk_norm:
      q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
    q_BxLxHxK = ctx.constrain(apply_rope(q_BxLxHxK, segments.q_positions, inv_freq, self.rope_scale),
                              ("batch", "length", "heads", "head_dim"))
    kv_axes = ("batch", "length", "kv_heads", "head_dim")
    k_BxLxGxK = ctx.constrain(apply_rope(k_BxLxGxK, segments.q_positions, inv_freq, self.rope_scale), kv_axes)
    v_BxLxGxK = ctx.constrain(v_BxLxGxK, kv_axes)
    k_BxSxGxK, v_BxSxGxK, kv, cache = decoding.extend(cache, k_BxLxGxK, v_BxLxGxK, segments)
    attn_BxLxHxK = decoding.attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segments, kv, ctx, self.dropout_rate, rng,
                                    self.window, local, self.scale, self.soft_cap)
    return self.o(attn_BxLxHxK, ctx), cache


class MLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate = layers.Dense((d,), (f,), ("embed",), ("mlp",), rngs=rngs, use_bias=cfg.mlp_bias)
    self.up = layers.Dense((d,), (f,), ("embed",), ("mlp",), rngs=rngs, use_bias=cfg.mlp_bias)
    self.down = layers.Dense((f,), (d,), ("mlp",), ("embed",), rngs=rngs, use_bias=cfg.mlp_bias)
    self.act = layers.ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x_BxLxD: jax.Array, ctx: layers.Context) -> jax.Array:
    gate_BxLxF, up_BxLxF = layers.dense_many((self.gate, self.up), x_BxLxD, ctx)
    h_BxLxF = ctx.constrain(self.act(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    return self.down(h_BxLxF, ctx)


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); Gemma's norms each sublayer's output too."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    norm = functools.partial(layers.RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, plus_one=cfg.gemma)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = norm()
    self.mlp = moe.MoE(cfg, rngs) if cfg.num_experts else MLP(cfg, rngs)
    self.out_norms = cfg.gemma
    if cfg.gemma:
      self.attn_out_norm, self.mlp_out_norm = norm(), norm()

  def __call__(self, x_BxLxD, inv_freq, segments, cache, rng, ctx, local=None):
    """(the block's output, (its updated cache, an MoE's routing load over the real tokens or None))."""
    h_BxLxD, cache = self.attn(self.attn_norm(x_BxLxD), inv_freq, segments, cache, rng, ctx, local)
    x_BxLxD = x_BxLxD + (self.attn_out_norm(h_BxLxD) if self.out_norms else h_BxLxD)
    if isinstance(self.mlp, moe.MoE):
      h_BxLxD, load = self.mlp(self.mlp_norm(x_BxLxD), ctx, segments.q_segments > 0)
    else:
      h_BxLxD, load = self.mlp(self.mlp_norm(x_BxLxD), ctx), None
    return x_BxLxD + (self.mlp_out_norm(h_BxLxD) if self.out_norms else h_BxLxD), (cache, load)


class LlamaLM(nnx.Module):
  """Token embedding, decoder blocks, final RMSNorm and the (tied or separate) LM head."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = jax.nn.initializers.normal(0.02)
    self.embed = layers.param(rngs, normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    self.layers = layers.stack(lambda r: Block(cfg, r), cfg.num_hidden_layers, rngs)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, plus_one=cfg.gemma)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense((cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs,
                                  use_bias=False)

  def init_cache(self, batch: int, slots: int, dtype: jnp.dtype, *, ctx: layers.Context) -> decoding.Cache:
    del ctx  # allocates only
    c = self.cfg
    return decoding.init_cache(batch, slots, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype)

  def __call__(self, batch: dict[str, jax.Array], *, ctx: layers.Context, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, cache: decoding.Cache | None = None,
               remat: str = "none", vocab_block: int = 0) -> dict[str, Any]:
    """`logits` (B x L x V, float32) and the updated `cache` (None when called without one). With `vocab_block`
    > 0 (a loss; no cache) `logits` is a vocab.TiledHead the cross-entropy reads that many rows at a time. An MoE
    with output_router_logits adds `aux_loss`, the weighted load-balancing loss to add to the mean loss (no cache)."""
    c = self.cfg
    segments = decoding.Segments.of(batch, cache)
    # (K/2,), or N x K/2 (Gemma 3) passed through the scan with each layer; longrope picks factors by position
    inv_freq = layer_frequencies(c, segments.q_positions)
    x_BxLxD = layers.lookup(self.embed[...], batch["input_ids"], c.pad_token_id).astype(dtype)
    if c.gemma:  # HF multiplies by sqrt(D) rounded to the weights' (here the compute) dtype
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(c.hidden_size), dtype)

    def body(block: Block, x_BxLxD: jax.Array, xs: tuple[Any, ...], ctx: layers.Context):
      layer_cache, rng, local, layer_freq = xs
      return block(ctx.constrain(x_BxLxD, ("batch", "length", "embed")), inv_freq if layer_freq is None else layer_freq,
                   segments, layer_cache, rng, ctx, local)

    dropout = dropout_rng is not None and c.attention_dropout > 0
    rngs = jax.random.split(dropout_rng, c.num_hidden_layers) if dropout else None  # one a layer
    xs = (None if cache is None else cache.layers, rngs, sliding_layers(c), inv_freq if inv_freq.ndim == 2 else None)
    x_BxLxD, (new_layers, load) = layers.scan(self.layers, body, x_BxLxD, xs, ctx, remat, not c.scan_layers)
    x_BxLxD = self.norm(x_BxLxD)
    routed = c.output_router_logits and load is not None and cache is None
    aux = {"aux_loss": moe.aux_loss(load, segments.q_segments > 0, c)} if routed else {}
    if vocab_block > 0 and cache is None:
      table = self.embed[...] if c.tie_word_embeddings else vocab.dense_table(self.lm_head, ctx)
      if table is not None:  # None: an lm_head adapter drawing dropout, computed the plain way below
        head = vocab.head(x_BxLxD, table, 0 if c.tie_word_embeddings else 1, vocab_block,
                          soft_cap=c.final_logit_softcapping)
        return {"logits": head, "cache": None, **aux}
    if c.tie_word_embeddings:
      logits_BxLxV = x_BxLxD @ self.embed[...].astype(dtype).T
    else:
      logits_BxLxV = self.lm_head(x_BxLxD, ctx)
    new_cache = None if cache is None else decoding.Cache(new_layers, cache.segment_ids, cache.positions, cache.length)
    logits_BxLxV = ctx.constrain(logits_BxLxV, ("batch", "length", "vocab"))
    return {"logits": layers.soft_cap(logits_BxLxV.astype(jnp.float32), c.final_logit_softcapping),
            "cache": decoding.advance(new_cache, segments), **aux}


def hf_param_map(cfg: LlamaConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF LlamaForCausalLM key, layout kind; see weights.py)."""
  m = {"embed": ("model.embed_tokens.weight", "copy"), "norm.scale": ("model.norm.weight", "copy")}
  if not cfg.tie_word_embeddings:
    m["lm_head.kernel"] = ("lm_head.weight", "linear")
  ours, theirs = "layers", "model.layers.{i}"  # stacked: {i} runs over the N layers
  m[f"{ours}.attn_norm.scale"] = (f"{theirs}.input_layernorm.weight", "copy")
  m[f"{ours}.mlp_norm.scale"] = (f"{theirs}.post_attention_layernorm.weight", "copy")
  for name, hf_name, bias in [("q", "q_proj", cfg.qkv_bias), ("k", "k_proj", cfg.qkv_bias),
                              ("v", "v_proj", cfg.qkv_bias), ("o", "o_proj", cfg.o_bias)]:
    kind = "linear_hk" if name == "o" else "linear"  # o contracts (heads, head_dim)
    m[f"{ours}.attn.{name}.kernel"] = (f"{theirs}.self_attn.{hf_name}.weight", kind)
    if bias:
      m[f"{ours}.attn.{name}.bias"] = (f"{theirs}.self_attn.{hf_name}.bias", "copy" if name == "o" else "flat")
  if cfg.qk_norm:
    for name in ("q_norm", "k_norm"):
      m[f"{ours}.attn.{name}.scale"] = (f"{theirs}.self_attn.{name}.weight", "copy")
  for name in ("gate", "up", "down"):
    m[f"{ours}.mlp.{name}.kernel"] = (f"{theirs}.mlp.{name}_proj.weight", "linear")
    if cfg.mlp_bias:
      m[f"{ours}.mlp.{name}.bias"] = (f"{theirs}.mlp.{name}_proj.bias", "copy")
  return m


def hf_ignored_keys(cfg: LlamaConfig) -> tuple[str, ...]:
  """Buffers, and the duplicate lm_head some checkpoints store even when it is tied."""
  return (r".*rotary_emb\.inv_freq$",) + ((r"lm_head\.weight",) if cfg.tie_word_embeddings else ())
