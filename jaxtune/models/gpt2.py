"""GPT-2: learned positions, pre-LayerNorm blocks, fused QKV, tied LM head.

Dimensions: N layers, B batch, L length, D model dim, H heads, K head dim, F mlp dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import decoding, layers, vocab


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int
  n_embd: int
  n_layer: int
  n_head: int
  n_positions: int
  n_inner: int | None = None  # mlp dim; 4 * n_embd when None
  layer_norm_epsilon: float = 1e-5
  activation_function: str = "gelu_new"
  embd_pdrop: float = 0.1  # dropout on the summed token + position embeddings
  attn_pdrop: float = 0.1  # dropout on the attention probabilities
  resid_pdrop: float = 0.1  # dropout on each residual branch (attention and MLP outputs)
  scale_attn_by_inverse_layer_idx: bool = False
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code

  DROPOUT_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")  # HF config keys; model.dropout sets them all

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int = 0, dropout: float | None = None,
              head: str = "causal_lm") -> GPT2Config:
    del num_labels, head  # a language model's head is its LM head
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: hf[k] for k in names if k in hf})
    return cfg if dropout is None else dataclasses.replace(cfg, **dict.fromkeys(cls.DROPOUT_KEYS, dropout))

  @property
  def mlp_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


class Block(nnx.Module):
  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    d, h = cfg.n_embd, cfg.n_head
    k = d // h
    self.ln_1 = layers.LayerNorm(d, cfg.layer_norm_epsilon, rngs=rngs)
    self.qkv = layers.Dense((d,), (3, h, k), ("embed",), (None, "heads", "head_dim"), rngs=rngs)
    self.attn_out = layers.Dense((h, k), (d,), ("heads", "head_dim"), ("embed",), rngs=rngs)
    self.ln_2 = layers.LayerNorm(d, cfg.layer_norm_epsilon, rngs=rngs)
    self.mlp_in = layers.Dense((d,), (cfg.mlp_dim,), ("embed",), ("mlp",), rngs=rngs)
    self.mlp_out = layers.Dense((cfg.mlp_dim,), (d,), ("mlp",), ("embed",), rngs=rngs)
    self.act = layers.ACTIVATIONS[cfg.activation_function]
    self.rate, self.attn_rate = cfg.resid_pdrop, cfg.attn_pdrop
    self.scale_by_layer = cfg.scale_attn_by_inverse_layer_idx

  def __call__(self, x_BxLxD, segments, cache, rng, index, ctx):
    r_probs, r_attn, r_mlp = layers.split_rng(rng, 3)
    qkv_BxLx3xHxK = ctx.constrain(self.qkv(self.ln_1(x_BxLxD), ctx), ("batch", "length", None, "heads", "head_dim"))
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    if self.scale_by_layer:  # HF's optional extra 1/(layer+1) on the attention logits, folded into the query
      q_BxLxHxK = q_BxLxHxK / (index + 1).astype(q_BxLxHxK.dtype)
    k_all, v_all, kv, cache = decoding.extend(cache, k_BxLxHxK, v_BxLxHxK, segments)
    attn_BxLxHxK = decoding.attend(q_BxLxHxK, k_all, v_all, segments, kv, ctx, self.attn_rate, r_probs)
    x_BxLxD = x_BxLxD + layers.dropout(self.attn_out(attn_BxLxHxK, ctx), self.rate, r_attn)
    h_BxLxF = ctx.constrain(self.act(self.mlp_in(self.ln_2(x_BxLxD), ctx)), ("batch", "length", "mlp"))
    return x_BxLxD + layers.dropout(self.mlp_out(h_BxLxF, ctx), self.rate, r_mlp), cache


class GPT2LM(nnx.Module):
  """Token + position embeddings, blocks, final LayerNorm, logits against the token embedding."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    normal = jax.nn.initializers.normal(0.02)
    self.wte = layers.param(rngs, normal, (cfg.vocab_size, cfg.n_embd), ("vocab", "embed"))
    self.wpe = layers.param(rngs, normal, (cfg.n_positions, cfg.n_embd), (None, "embed"))
    self.blocks = layers.stack(lambda r: Block(cfg, r), cfg.n_layer, rngs)
    self.ln_f = layers.LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, rngs=rngs)

  def init_cache(self, batch: int, slots: int, dtype: jnp.dtype, *, ctx: layers.Context) -> decoding.Cache:
    del ctx  # allocates only
    c = self.cfg
    return decoding.init_cache(batch, slots, c.n_layer, c.n_head, c.n_embd // c.n_head, dtype)

  def __call__(self, batch: dict[str, jax.Array], *, ctx: layers.Context, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, cache: decoding.Cache | None = None,
               remat: str = "none", vocab_block: int = 0) -> dict[str, Any]:
    """`logits` (B x L x V, float32) and the updated `cache` (None when called without one). With `vocab_block`
    > 0 (a loss; no cache) `logits` is a vocab.TiledHead the cross-entropy reads that many rows at a time."""
    n = self.cfg.n_layer
    segments = decoding.Segments.of(batch, cache)
    rngs = None if dropout_rng is None else jax.random.split(dropout_rng, n + 1)  # [0] embeddings, [1:] layers
    x_BxLxD = self.wte[...][batch["input_ids"]] + self.wpe[...][batch["positions"]]
    x_BxLxD = layers.dropout(x_BxLxD.astype(dtype), self.cfg.embd_pdrop, None if rngs is None else rngs[0])

    def body(block: Block, x_BxLxD: jax.Array, xs: tuple[Any, Any, jax.Array], ctx: layers.Context):
      layer_cache, rng, index = xs
      return block(ctx.constrain(x_BxLxD, ("batch", "length", "embed")), segments, layer_cache, rng, index, ctx)

    xs = (None if cache is None else cache.layers, None if rngs is None else rngs[1:], jnp.arange(n))
    x_BxLxD, new_layers = layers.scan(self.blocks, body, x_BxLxD, xs, ctx, remat, not self.cfg.scan_layers)
    if vocab_block > 0 and cache is None:
      return {"logits": vocab.head(self.ln_f(x_BxLxD), self.wte[...], 0, vocab_block), "cache": None}
    logits_BxLxV = self.ln_f(x_BxLxD) @ self.wte[...].astype(dtype).T
    logits_BxLxV = ctx.constrain(logits_BxLxV, ("batch", "length", "vocab"))
    new_cache = None if cache is None else cache._replace(layers=new_layers)
    return {"logits": logits_BxLxV.astype(jnp.float32), "cache": decoding.advance(new_cache, segments)}


def hf_param_map(cfg: GPT2Config) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF GPT2LMHeadModel key, layout kind). HF's Conv1D stores (in, out)."""
  del cfg  # one entry per stacked param, whatever the depth
  m = {"wte": ("transformer.wte.weight", "copy"), "wpe": ("transformer.wpe.weight", "copy"),
       "ln_f.scale": ("transformer.ln_f.weight", "copy"), "ln_f.bias": ("transformer.ln_f.bias", "copy")}
  ours, theirs = "blocks", "transformer.h.{i}"  # stacked: {i} runs over the N layers
  for name, hf_name, kind in [("qkv", "attn.c_attn", "conv"), ("attn_out", "attn.c_proj", "conv_hk"),
                              ("mlp_in", "mlp.c_fc", "conv"), ("mlp_out", "mlp.c_proj", "conv")]:
    m[f"{ours}.{name}.kernel"] = (f"{theirs}.{hf_name}.weight", kind)
    m[f"{ours}.{name}.bias"] = (f"{theirs}.{hf_name}.bias", "flat")
  for name in ("ln_1", "ln_2"):
    m[f"{ours}.{name}.scale"] = (f"{theirs}.{name}.weight", "copy")
    m[f"{ours}.{name}.bias"] = (f"{theirs}.{name}.bias", "copy")
  return m


def hf_ignored_keys(cfg: GPT2Config) -> tuple[str, ...]:
  """Causal-mask buffers of old checkpoints and the tied lm_head copy."""
  del cfg
  return (r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")
