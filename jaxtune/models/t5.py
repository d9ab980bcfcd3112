"""T5 (v1.0, v1.1, Flan-T5): an encoder-decoder with relative position buckets, RMS norms and no biases.

Each stack computes one relative-position bias (buckets of key - query distance, bidirectional in
the encoder, causal in the decoder) from its first layer's table and adds it to every layer's
attention logits, which T5 does not scale by 1/sqrt(K). The MLP is ReLU (v1.0) or gated-GELU (v1.1,
Flan). A tied LM head (v1.0) scores d_model**-0.5 times the decoder output against the shared
embedding; an untied one (v1.1) has its own matrix.

Dimensions: N layers, B batch, S source length, T target length, D model dim, H heads, K head dim,
F mlp dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import UserError
from jaxtune.models import encdec, layers, vocab
from jaxtune.models.attention import Mask


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_decoder_layers: int | None = None  # None: num_layers
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1, Flan-T5)
  tie_word_embeddings: bool = True  # the LM head is the shared embedding (v1.1 checkpoints have their own lm_head)
  scale_decoder_outputs: bool | None = None  # times d_model**-0.5 before the head; None: when tied (v1.0)
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code

  DROPOUT_KEYS = ("dropout_rate",)  # HF config keys; model.dropout sets them all

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int = 0, dropout: float | None = None,
              head: str = "seq2seq") -> T5Config:
    del num_labels, head  # the LM head is the model's only head
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: hf[k] for k in names if k in hf and hf[k] is not None})
    if cfg.feed_forward_proj not in ("relu", "gated-gelu", "gated-relu", "gelu"):
      raise UserError(f"T5 feed_forward_proj {cfg.feed_forward_proj!r} is not supported; jaxtune runs relu, gelu, "
                      "gated-relu and gated-gelu.")
    return cfg if dropout is None else dataclasses.replace(cfg, dropout_rate=dropout)

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def scale(self) -> bool:
    """transformers 5 saves every T5 as tied, and says with this flag whether it is a v1.0 that rescales."""
    return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    act = self.feed_forward_proj.removeprefix("gated-")
    return "gelu_new" if act == "gelu" else act  # HF maps T5's gelu to the tanh approximation


class MLP(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    dense = lambda i, o, ia, oa: layers.Dense(i, o, ia, oa, rngs=rngs, use_bias=False)
    if cfg.gated:
      self.wi_0 = dense((d,), (f,), ("embed",), ("mlp",))
      self.wi_1 = dense((d,), (f,), ("embed",), ("mlp",))
    else:
      self.wi = dense((d,), (f,), ("embed",), ("mlp",))
    self.wo = dense((f,), (d,), ("mlp",), ("embed",))
    self.act, self.gated, self.rate = layers.ACTIVATIONS[cfg.act], cfg.gated, cfg.dropout_rate

  def __call__(self, x_BxTxD: jax.Array, rng: jax.Array | None, ctx: layers.Context) -> jax.Array:
    if self.gated:
      gate, up = layers.dense_many((self.wi_0, self.wi_1), x_BxTxD, ctx)
      h = self.act(gate) * up
    else:
      h = self.act(self.wi(x_BxTxD, ctx))
    h = ctx.constrain(h, ("batch", "length", "mlp"))
    return self.wo(layers.dropout(h, self.rate, rng), ctx)


def attention(cfg: T5Config, rngs: nnx.Rngs) -> encdec.Attention:
  """T5's attention: no biases, and no 1/sqrt(K) on the logits (folded into T5's init)."""
  return encdec.Attention(cfg.d_model, cfg.num_heads, cfg.d_kv, use_bias=False, scale=None, rate=cfg.dropout_rate,
                          rngs=rngs)


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.attn_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.attn = attention(cfg, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.mlp = MLP(cfg, rngs)
    self.rate = cfg.dropout_rate

  def __call__(self, x, mask, rng, ctx):
    r_probs, r_attn, r_act, r_mlp = layers.split_rng(rng, 4)
    h = self.attn_norm(x)
    x = x + layers.dropout(self.attn(h, *self.attn.kv(h, ctx), mask, r_probs, ctx), self.rate, r_attn)
    return x + layers.dropout(self.mlp(self.mlp_norm(x), r_act, ctx), self.rate, r_mlp)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.self_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.self_attn = attention(cfg, rngs)
    self.cross_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.cross_attn = attention(cfg, rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.mlp = MLP(cfg, rngs)
    self.rate = cfg.dropout_rate

  def __call__(self, x, memory, self_mask, cross_mask, rng, ctx, cache: encdec.LayerCache | None = None,
               start: jax.Array | None = None):
    """The layer's output; with a `cache`, the new tokens' keys/values are written at `start` and the
    cross-attention reads the cached ones: returns (output, updated cache)."""
    r = layers.split_rng(rng, 6)
    h, new_cache = encdec.self_attention(self.self_attn, self.self_norm(x), self_mask, r[0], ctx, cache, start)
    x = x + layers.dropout(h, self.rate, r[1])
    h = encdec.cross_attention(self.cross_attn, self.cross_norm(x), memory, cross_mask, r[2], ctx, cache)
    x = x + layers.dropout(h, self.rate, r[3])
    x = x + layers.dropout(self.mlp(self.mlp_norm(x), r[4], ctx), self.rate, r[5])
    return x if cache is None else (x, new_cache)


def relative_buckets(relative_TxS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket of each key - query distance: exact up to num_buckets / 4 (/ 2 causal), then log-spaced up to
  max_distance; bidirectional buckets give the upper half to keys after the query."""
  buckets = jnp.zeros_like(relative_TxS)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_TxS > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_TxS)
  else:
    distance = -jnp.minimum(relative_TxS, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
  large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(distance < exact, distance, large)


class Stack(nnx.Module):
  """Embedded tokens -> layers (sharing one relative-position bias) -> final RMS norm."""

  def __init__(self, cfg: T5Config, decoder: bool, rngs: nnx.Rngs):
    n = cfg.decoder_layers if decoder else cfg.num_layers
    make = (lambda r: DecoderLayer(cfg, r)) if decoder else (lambda r: EncoderLayer(cfg, r))
    self.position_bias = layers.param(rngs, jax.nn.initializers.normal(1.0),
                                      (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"))
    self.layers = layers.stack(make, n, rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs)
    self.decoder, self.num_layers, self.scan_layers = decoder, n, cfg.scan_layers
    self.buckets, self.max_distance, self.rate = (cfg.relative_attention_num_buckets,
                                                  cfg.relative_attention_max_distance, cfg.dropout_rate)

  def bias(self, q_positions_T: jax.Array, k_positions_S: jax.Array) -> jax.Array:
    """1 x H x T x S relative-position bias."""
    buckets_TxS = relative_buckets(k_positions_S[None, :] - q_positions_T[:, None], not self.decoder, self.buckets,
                                   self.max_distance)
    return jnp.transpose(self.position_bias[...][buckets_TxS], (2, 0, 1))[None]

  def __call__(self, x, mask_BxT, memory, memory_mask_BxS, rng, remat, ctx):
    rngs = None if rng is None else jax.random.split(rng, self.num_layers + 2)
    x = layers.dropout(x, self.rate, None if rngs is None else rngs[0])
    t = x.shape[1]
    self_mask = Mask(kv_segments=mask_BxT, causal=self.decoder, bias=self.bias(jnp.arange(t), jnp.arange(t)))
    cross_mask = Mask(kv_segments=memory_mask_BxS) if self.decoder else None
    x = encdec.run_stack(self.layers, x, memory if self.decoder else None, self_mask, cross_mask,
                         None if rngs is None else rngs[1:-1], remat, self.scan_layers, ctx)
    return layers.dropout(self.final_norm(x), self.rate, None if rngs is None else rngs[-1])

  def cross_kv(self, memory_BxSxD: jax.Array, ctx: layers.Context) -> tuple[jax.Array, jax.Array]:
    return encdec.cross_kv(self.layers, memory_BxSxD, self.scan_layers, ctx)

  def step(self, x_BxLxD: jax.Array, cache: encdec.Cache, ctx: layers.Context) -> tuple[jax.Array, encdec.Cache]:
    """The decoder on L new tokens at positions cache.length.., reading and extending the cache."""
    q_positions = cache.length + jnp.arange(x_BxLxD.shape[1])
    k_positions = jnp.arange(cache.layers.self_k.shape[2])
    self_mask = encdec.cache_mask(q_positions, k_positions, self.bias(q_positions, k_positions))
    x, cache = encdec.step_stack(self.layers, x_BxLxD, self_mask, cache, self.scan_layers, ctx)
    return self.final_norm(x), cache


class T5(nnx.Module):
  """Shared embedding, encoder and decoder stacks, LM head (tied and rescaled, or its own)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shared = layers.param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.encoder = Stack(cfg, False, rngs)
    self.decoder = Stack(cfg, True, rngs)
    self.lm_head = (nnx.data(None) if cfg.tie_word_embeddings else
                    layers.Dense((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs, use_bias=False))

  def encode(self, batch, dtype, *, ctx, rng=None, remat="none"):
    """The encoder output (B x S x D) of the source (input_ids, attention_mask)."""
    x = layers.lookup(self.shared[...], batch["input_ids"]).astype(dtype)
    return self.encoder(x, batch["attention_mask"], None, None, rng, remat, ctx)

  def decode(self, batch, memory, dtype, ctx, rng=None, remat="none", vocab_block=0):
    ids = batch.get("decoder_input_ids")
    if ids is None:  # teacher forcing on the labels
      ids = layers.shift_right(batch["labels"], self.cfg.decoder_start_token_id)
    y = layers.lookup(self.shared[...], ids).astype(dtype)
    mask = batch.get("decoder_attention_mask", jnp.ones_like(ids))
    return self.head(self.decoder(y, mask, memory, batch["attention_mask"], rng, remat, ctx), ctx, vocab_block)

  def head(self, y_BxTxD: jax.Array, ctx: layers.Context, vocab_block: int = 0) -> jax.Array | vocab.TiledHead:
    """Logits (B x T x V), or with `vocab_block` > 0 the vocab.TiledHead a loss reads block by block."""
    if self.cfg.scale:
      y_BxTxD = y_BxTxD * self.cfg.d_model ** -0.5
    if vocab_block > 0:
      table = self.shared[...] if self.lm_head is None else vocab.dense_table(self.lm_head, ctx)
      if table is not None:  # None: an lm_head adapter drawing dropout, computed the plain way below
        return vocab.head(y_BxTxD, table, 0 if self.lm_head is None else 1, vocab_block)
    if self.lm_head is None:
      return jnp.einsum("btd,vd->btv", y_BxTxD, self.shared[...].astype(y_BxTxD.dtype))
    return self.lm_head(y_BxTxD, ctx)

  def init_cache(self, memory_BxSxD: jax.Array, memory_mask_BxS: jax.Array, slots: int, dtype: jnp.dtype, *,
                 ctx: layers.Context) -> encdec.Cache:
    """A decoding cache of `slots` target positions over this encoder output."""
    return encdec.new_cache(self.decoder.cross_kv(memory_BxSxD, ctx), memory_mask_BxS, slots, dtype)

  def decode_step(self, ids_BxL: jax.Array, cache: encdec.Cache, dtype: jnp.dtype, *,
                  ctx: layers.Context) -> tuple[jax.Array, encdec.Cache]:
    """(float32 logits B x L x V of the next tokens, the extended cache) for L new decoder tokens."""
    y, cache = self.decoder.step(layers.lookup(self.shared[...], ids_BxL).astype(dtype), cache, ctx)
    return self.head(y, ctx).astype(jnp.float32), cache

  def __call__(self, batch: dict[str, jax.Array], *, ctx: layers.Context, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, remat: str = "none", vocab_block: int = 0) -> dict[str, Any]:
    """`logits` (B x T x V, float32) of each target position given the source (input_ids, attention_mask) and
    the target so far (decoder_input_ids, or the labels shifted right); `hidden`: the encoder output (B x S x D).
    With `vocab_block` > 0 (a loss) `logits` is a vocab.TiledHead the cross-entropy reads block by block."""
    r_enc, r_dec = layers.split_rng(dropout_rng, 2)
    memory = self.encode(batch, dtype, ctx=ctx, rng=r_enc, remat=remat)
    logits = self.decode(batch, memory, dtype, ctx, r_dec, remat, vocab_block)
    return {"logits": logits if isinstance(logits, vocab.TiledHead) else logits.astype(jnp.float32), "hidden": memory}


def hf_param_map(cfg: T5Config) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF T5ForConditionalGeneration key, layout kind); one entry per stacked param."""
  m = {"shared": ("shared.weight", "copy"),
       "encoder.position_bias": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "copy"),
       "decoder.position_bias": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "copy"),
       "encoder.final_norm.scale": ("encoder.final_layer_norm.weight", "copy"),
       "decoder.final_norm.scale": ("decoder.final_layer_norm.weight", "copy")}
  if not cfg.tie_word_embeddings:
    m["lm_head.kernel"] = ("lm_head.weight", "linear")
  mlp = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
  sublayers = {"encoder": [("attn_norm", "attn", "SelfAttention"), ("mlp_norm", "mlp", None)],
               "decoder": [("self_norm", "self_attn", "SelfAttention"), ("cross_norm", "cross_attn", "EncDecAttention"),
                           ("mlp_norm", "mlp", None)]}
  for stack, parts in sublayers.items():
    for index, (norm, ours, hf_attention) in enumerate(parts):
      theirs = f"{stack}.block.{{i}}.layer.{index}"  # stacked: {i} runs over the N layers
      m[f"{stack}.layers.{norm}.scale"] = (f"{theirs}.layer_norm.weight", "copy")
      if hf_attention is None:
        for name in mlp:
          m[f"{stack}.layers.mlp.{name}.kernel"] = (f"{theirs}.DenseReluDense.{name}.weight", "linear")
        continue
      for name in "qkv":
        m[f"{stack}.layers.{ours}.{name}.kernel"] = (f"{theirs}.{hf_attention}.{name}.weight", "linear")
      m[f"{stack}.layers.{ours}.o.kernel"] = (f"{theirs}.{hf_attention}.o.weight", "linear_hk")
  return m


def hf_ignored_keys(cfg: T5Config) -> tuple[str, ...]:
  """The stacks' embed_tokens are the shared embedding under other names (and a tied lm_head is too)."""
  tied = (r"lm_head\.weight",) if cfg.tie_word_embeddings else ()
  return (r"(encoder|decoder)\.embed_tokens\.weight", *tied)
