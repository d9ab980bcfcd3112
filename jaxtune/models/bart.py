"""BART and Marian (OPUS-MT): post-LN encoder-decoders with biases, LayerNorm and absolute positions.

Both follow transformers' BartForConditionalGeneration / MarianMTModel. Tokens are embedded times
sqrt(D) when scale_embedding, plus a position embedding: BART's is learned, with two spare rows in
front (position p reads row p + 2); Marian's is a fixed sinusoidal table (sines in the first half of
the dims, cosines in the second, not interleaved), computed here, never loaded. BART then normalises
the sum (layernorm_embedding); Marian does not. Every layer is post-LN, x = LN(x + sublayer(x)),
with attention scaled by K**-0.5 and biases on every projection; neither stack ends with a norm.
Dropout sits where transformers puts it: `dropout` on the embeddings and on each sublayer's output
before its residual add, `attention_dropout` on the attention probabilities, `activation_dropout`
after the MLP's activation. LayerDrop (encoder_layerdrop / decoder_layerdrop, 0 in the released
checkpoints) is not implemented.

The LM head scores the decoder output against the decoder's token embedding (tie_word_embeddings),
or its own matrix, and adds `final_logits_bias`. transformers keeps that bias as a buffer, saved
with the weights but never trained, so here it is a param (so that it loads and exports) under
the leaf name `bias` (no weight decay) read through stop_gradient: fine-tuning leaves it unchanged, as
in PyTorch.

Embedding tables, as transformers 5 ties them: with tie_word_embeddings, BART and a Marian that
shares its vocabularies have one table (model.shared) for the encoder, the decoder and the head; a
Marian that does not (share_encoder_decoder_embeddings false) has one per stack, the decoder's
doubling as the head. Without tie_word_embeddings nothing is tied: each stack reads its own
embed_tokens and the head has its own matrix (the checkpoint's model.shared, which nothing reads,
is dropped).

Dimensions: N layers, B batch, S source length, T target length, L new tokens, D model dim, H heads,
K head dim, F mlp dim, V vocab (the decoder's for the head), P positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import UserError
from jaxtune.models import encdec, layers, vocab
from jaxtune.models.attention import Mask

FAMILIES = ("bart", "marian")
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's spare rows in front of position 0
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which every norm of both models keeps
ACTIVATIONS = {**layers.ACTIVATIONS, "swish": jax.nn.silu, "tanh": jnp.tanh}  # HF's ACT2FN names (Marian: swish)
# The special tokens of HF's config classes, for a config.json that leaves them out.
TOKEN_DEFAULTS = {"bart": {"pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2},
                  "marian": {"pad_token_id": 58100, "eos_token_id": 0}}  # Marian starts from its pad token


@dataclasses.dataclass(frozen=True)
class BartConfig:
  vocab_size: int
  d_model: int
  encoder_layers: int
  decoder_layers: int
  encoder_attention_heads: int
  decoder_attention_heads: int
  encoder_ffn_dim: int
  decoder_ffn_dim: int
  max_position_embeddings: int
  family: str = "bart"  # HF model_type: "bart" or "marian"
  activation_function: str = "gelu"  # Marian's OPUS-MT checkpoints: "swish"
  scale_embedding: bool = False  # token embeddings times sqrt(d_model) (Marian: true)
  dropout: float = 0.1  # embeddings and every sublayer's output
  attention_dropout: float = 0.0  # attention probabilities
  activation_dropout: float = 0.0  # the MLP's hidden activations
  share_encoder_decoder_embeddings: bool = True  # Marian: false gives the decoder its own vocabulary and table
  decoder_vocab_size: int | None = None  # Marian's decoder vocabulary when not shared; None: vocab_size
  tie_word_embeddings: bool = True  # the head scores against the decoder's token embedding
  pad_token_id: int = 1  # its embedding row gets no gradient from the inputs (HF's padding_idx)
  eos_token_id: int | tuple[int, ...] = 2
  decoder_start_token_id: int = 2  # BART: </s>; Marian: the pad token
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code

  DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout")  # HF config keys; model.dropout sets them all

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int = 0, dropout: float | None = None,
              head: str = "seq2seq") -> BartConfig:
    del num_labels, head  # the LM head is the model's only head
    family = hf.get("model_type", "bart")
    if family not in FAMILIES:
      raise UserError(f"model_type {family!r} is not a BART-style model; jaxtune's bart module runs {FAMILIES}.")
    if pre_ln := [k for k in ("normalize_before", "add_final_layer_norm") if hf.get(k)]:
      raise UserError(f"this {family} config sets {pre_ln}: a pre-LN (mBART-style) model, but BART and Marian are "
                      "post-LN; use a checkpoint of the post-LN architecture.")
    names = {f.name for f in dataclasses.fields(cls)} - {"family", "scan_layers"}
    if family == "bart":  # BartConfig has neither: one vocabulary, always shared
      names -= {"share_encoder_decoder_embeddings", "decoder_vocab_size"}
    given = {**TOKEN_DEFAULTS[family], **{k: hf[k] for k in names if hf.get(k) is not None}}
    given.setdefault("decoder_start_token_id", given["pad_token_id"])
    if isinstance(given["eos_token_id"], list):
      given["eos_token_id"] = tuple(given["eos_token_id"])
    cfg = cls(**given, family=family)
    if cfg.activation_function not in ACTIVATIONS:
      raise UserError(f"{family} activation_function {cfg.activation_function!r} is not supported; jaxtune runs "
                      f"{sorted(ACTIVATIONS)}.")
    for side in ("encoder", "decoder"):
      if cfg.d_model % getattr(cfg, f"{side}_attention_heads"):
        raise UserError(f"{family} d_model {cfg.d_model} is not a multiple of {side}_attention_heads "
                        f"{getattr(cfg, f'{side}_attention_heads')}; the config.json is inconsistent.")
    return cfg if dropout is None else dataclasses.replace(cfg, **dict.fromkeys(cls.DROPOUT_KEYS, dropout))

  @property
  def shared(self) -> bool:
    """One token table (model.shared) for the encoder, the decoder and the head."""
    return self.tie_word_embeddings and (self.family == "bart" or self.share_encoder_decoder_embeddings)

  @property
  def target_vocab(self) -> int:
    """The decoder's vocabulary: its embedding rows, the head's outputs."""
    if self.family == "bart" or self.share_encoder_decoder_embeddings:
      return self.vocab_size
    return self.decoder_vocab_size or self.vocab_size

  @property
  def layernorm_embedding(self) -> bool:
    return self.family == "bart"

  @property
  def learned_positions(self) -> bool:
    return self.family == "bart"

  @property
  def embed_scale(self) -> float:
    return float(np.sqrt(self.d_model)) if self.scale_embedding else 1.0


@functools.lru_cache(maxsize=8)
def sinusoidal_table(positions: int, dim: int) -> np.ndarray:
  """Marian's P x D position table, float32 from float64 as MarianSinusoidalPositionalEmbedding builds it: column j
  of the first ceil(D / 2) holds sin(p / 10000**(2j / D)), column j of the rest cos(p / 10000**(2j / D))."""
  p = np.arange(positions, dtype=np.float64)[:, None]
  angle = lambda j: p / np.power(10000.0, 2 * j / dim)
  sin, cos = np.sin(angle(np.arange((dim + 1) // 2))), np.cos(angle(np.arange(dim // 2)))
  table = np.concatenate([sin, cos], axis=1).astype(np.float32)
  table.flags.writeable = False  # cached: shared by every call
  return table


def attention(cfg: BartConfig, heads: int, rngs: nnx.Rngs) -> encdec.Attention:
  """BART's and Marian's attention: biases on every projection, logits scaled by K**-0.5."""
  k = cfg.d_model // heads
  return encdec.Attention(cfg.d_model, heads, k, use_bias=True, scale=k ** -0.5, rate=cfg.attention_dropout, rngs=rngs)


class MLP(nnx.Module):
  """fc1, activation, activation dropout, fc2."""

  def __init__(self, cfg: BartConfig, f: int, rngs: nnx.Rngs):
    d = cfg.d_model
    self.fc1 = layers.Dense((d,), (f,), ("embed",), ("mlp",), rngs=rngs)
    self.fc2 = layers.Dense((f,), (d,), ("mlp",), ("embed",), rngs=rngs)
    self.act, self.rate = ACTIVATIONS[cfg.activation_function], cfg.activation_dropout

  def __call__(self, x_BxTxD: jax.Array, rng: jax.Array | None, ctx: layers.Context) -> jax.Array:
    h_BxTxF = ctx.constrain(self.act(self.fc1(x_BxTxD, ctx)), ("batch", "length", "mlp"))
    return self.fc2(layers.dropout(h_BxTxF, self.rate, rng), ctx)


class EncoderLayer(nnx.Module):
  """Post-LN: x = LN(x + dropout(attention(x))); x = LN(x + dropout(mlp(x)))."""

  def __init__(self, cfg: BartConfig, rngs: nnx.Rngs):
    self.attn = attention(cfg, cfg.encoder_attention_heads, rngs)
    self.attn_norm = layers.LayerNorm(cfg.d_model, LN_EPS, rngs=rngs)
    self.mlp = MLP(cfg, cfg.encoder_ffn_dim, rngs)
    self.mlp_norm = layers.LayerNorm(cfg.d_model, LN_EPS, rngs=rngs)
    self.rate = cfg.dropout

  def __call__(self, x, mask, rng, ctx):
    r_probs, r_attn, r_act, r_mlp = layers.split_rng(rng, 4)
    x = self.attn_norm(x + layers.dropout(self.attn(x, *self.attn.kv(x, ctx), mask, r_probs, ctx), self.rate, r_attn))
    return self.mlp_norm(x + layers.dropout(self.mlp(x, r_act, ctx), self.rate, r_mlp))


class DecoderLayer(nnx.Module):
  """Post-LN self-attention, cross-attention over the encoder output, MLP."""

  def __init__(self, cfg: BartConfig, rngs: nnx.Rngs):
    heads = cfg.decoder_attention_heads
    self.self_attn = attention(cfg, heads, rngs)
    self.self_norm = layers.LayerNorm(cfg.d_model, LN_EPS, rngs=rngs)
    self.cross_attn = attention(cfg, heads, rngs)
    self.cross_norm = layers.LayerNorm(cfg.d_model, LN_EPS, rngs=rngs)
    self.mlp = MLP(cfg, cfg.decoder_ffn_dim, rngs)
    self.mlp_norm = layers.LayerNorm(cfg.d_model, LN_EPS, rngs=rngs)
    self.rate = cfg.dropout

  def __call__(self, x, memory, self_mask, cross_mask, rng, ctx, cache: encdec.LayerCache | None = None,
               start: jax.Array | None = None):
    """The layer's output; with a `cache`, the new tokens' keys/values are written at `start` and the
    cross-attention reads the cached ones: returns (output, updated cache)."""
    r = layers.split_rng(rng, 6)
    h, new_cache = encdec.self_attention(self.self_attn, x, self_mask, r[0], ctx, cache, start)
    x = self.self_norm(x + layers.dropout(h, self.rate, r[1]))
    h = encdec.cross_attention(self.cross_attn, x, memory, cross_mask, r[2], ctx, cache)
    x = self.cross_norm(x + layers.dropout(h, self.rate, r[3]))
    x = self.mlp_norm(x + layers.dropout(self.mlp(x, r[4], ctx), self.rate, r[5]))
    return x if cache is None else (x, new_cache)


class Stack(nnx.Module):
  """Token and position embeddings (BART: normalised), dropout, the layers. No final norm."""

  def __init__(self, cfg: BartConfig, decoder: bool, rngs: nnx.Rngs):
    n = cfg.decoder_layers if decoder else cfg.encoder_layers
    make = (lambda r: DecoderLayer(cfg, r)) if decoder else (lambda r: EncoderLayer(cfg, r))
    d, normal = cfg.d_model, jax.nn.initializers.normal(0.02)
    vocab = cfg.target_vocab if decoder else cfg.vocab_size
    self.embed_tokens = (nnx.data(None) if cfg.shared else
                         layers.param(rngs, normal, (vocab, d), ("vocab", "embed")))
    self.embed_positions = (layers.param(rngs, normal, (cfg.max_position_embeddings + POSITION_OFFSET, d),
                                         (None, "embed")) if cfg.learned_positions else nnx.data(None))
    self.layernorm_embedding = (layers.LayerNorm(d, LN_EPS, rngs=rngs) if cfg.layernorm_embedding
                                else nnx.data(None))
    self.layers = layers.stack(make, n, rngs)
    self.decoder, self.num_layers, self.scan_layers = decoder, n, cfg.scan_layers
    self.rate, self.scale, self.padding_id = cfg.dropout, cfg.embed_scale, cfg.pad_token_id
    self.max_positions, self.d_model = cfg.max_position_embeddings, d

  def embed(self, ids_BxT: jax.Array, table_VxD: jax.Array, positions_T: jax.Array, dtype: jnp.dtype,
            rng: jax.Array | None) -> jax.Array:
    """Scaled token embeddings plus positions (BART: normalised), in float32 until cast to `dtype`; dropout."""
    table_VxD = table_VxD if self.embed_tokens is None else self.embed_tokens[...]
    x_BxTxD = layers.lookup(table_VxD, ids_BxT, self.padding_id) * self.scale
    if self.embed_positions is not None:
      x_BxTxD = x_BxTxD + self.embed_positions[...][positions_T + POSITION_OFFSET][None]
    else:
      x_BxTxD = x_BxTxD + jnp.asarray(sinusoidal_table(self.max_positions, self.d_model))[positions_T][None]
    if self.layernorm_embedding is not None:
      x_BxTxD = self.layernorm_embedding(x_BxTxD)
    return layers.dropout(x_BxTxD.astype(dtype), self.rate, rng)

  def __call__(self, ids_BxT, table_VxD, mask_BxT, memory, memory_mask_BxS, dtype, rng, remat, ctx):
    """The stack's output (B x T x D) on token ids; `table_VxD` is the shared token embedding (unused when the
    stack has its own)."""
    rngs = None if rng is None else jax.random.split(rng, self.num_layers + 1)
    t = ids_BxT.shape[1]
    x = self.embed(ids_BxT, table_VxD, jnp.arange(t), dtype, None if rngs is None else rngs[0])
    self_mask = Mask(kv_segments=mask_BxT, causal=self.decoder)
    cross_mask = Mask(kv_segments=memory_mask_BxS) if self.decoder else None
    return encdec.run_stack(self.layers, x, memory if self.decoder else None, self_mask, cross_mask,
                            None if rngs is None else rngs[1:], remat, self.scan_layers, ctx)

  def cross_kv(self, memory_BxSxD: jax.Array, ctx: layers.Context) -> tuple[jax.Array, jax.Array]:
    return encdec.cross_kv(self.layers, memory_BxSxD, self.scan_layers, ctx)

  def step(self, ids_BxL: jax.Array, table_VxD: jax.Array, cache: encdec.Cache, dtype: jnp.dtype,
           ctx: layers.Context) -> tuple[jax.Array, encdec.Cache]:
    """The decoder on L new tokens at positions cache.length.., reading and extending the cache."""
    q_positions = cache.length + jnp.arange(ids_BxL.shape[1])
    x = self.embed(ids_BxL, table_VxD, q_positions, dtype, None)
    self_mask = encdec.cache_mask(q_positions, jnp.arange(cache.layers.self_k.shape[2]))
    return encdec.step_stack(self.layers, x, self_mask, cache, self.scan_layers, ctx)


class LogitsBias(nnx.Module):
  """HF's final_logits_bias buffer (1 x V): loaded and exported with the weights, never trained."""

  def __init__(self, vocab: int, rngs: nnx.Rngs):
    self.bias = layers.param(rngs, jax.nn.initializers.zeros, (1, vocab), (None, "vocab"))

  def __call__(self, logits_BxTxV: jax.Array) -> jax.Array:
    return logits_BxTxV.astype(jnp.float32) + jax.lax.stop_gradient(self.bias[...])


class Bart(nnx.Module):
  """Token embeddings, encoder and decoder stacks, LM head (tied or its own) plus final_logits_bias."""

  def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.shared = (layers.param(rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed")) if cfg.shared else nnx.data(None))
    self.encoder = Stack(cfg, False, rngs)
    self.decoder = Stack(cfg, True, rngs)
    self.lm_head = (nnx.data(None) if cfg.tie_word_embeddings else
                    layers.Dense((cfg.d_model,), (cfg.target_vocab,), ("embed",), ("vocab",), rngs=rngs,
                                 use_bias=False))
    self.final_logits = LogitsBias(cfg.target_vocab, rngs)

  def _shared(self) -> jax.Array | None:
    return None if self.shared is None else self.shared[...]

  def encode(self, batch, dtype, *, ctx, rng=None, remat="none"):
    """The encoder output (B x S x D) of the source (input_ids, attention_mask)."""
    return self.encoder(batch["input_ids"], self._shared(), batch["attention_mask"], None, None, dtype, rng, remat,
                        ctx)

  def decode(self, batch, memory, dtype, ctx, rng=None, remat="none", vocab_block=0):
    ids = batch.get("decoder_input_ids")
    if ids is None:  # teacher forcing on the labels
      ids = layers.shift_right(batch["labels"], self.cfg.decoder_start_token_id)
    mask = batch.get("decoder_attention_mask", jnp.ones_like(ids))
    y = self.decoder(ids, self._shared(), mask, memory, batch["attention_mask"], dtype, rng, remat, ctx)
    return self.head(y, ctx, vocab_block)

  def head(self, y_BxTxD: jax.Array, ctx: layers.Context, vocab_block: int = 0) -> jax.Array | vocab.TiledHead:
    """float32 logits (B x T x V): the decoder's token table (or lm_head) plus final_logits_bias; with
    `vocab_block` > 0 the vocab.TiledHead a loss reads block by block."""
    if vocab_block > 0:
      table, axis = ((vocab.dense_table(self.lm_head, ctx), 1) if self.lm_head is not None else
                     (self.shared[...] if self.shared is not None else self.decoder.embed_tokens[...], 0))
      if table is not None:
        return vocab.head(y_BxTxD, table, axis, vocab_block, self.final_logits.bias[...][0])
    if self.lm_head is not None:
      return self.final_logits(self.lm_head(y_BxTxD, ctx))
    table_VxD = self.shared[...] if self.shared is not None else self.decoder.embed_tokens[...]
    return self.final_logits(jnp.einsum("btd,vd->btv", y_BxTxD, table_VxD.astype(y_BxTxD.dtype)))

  def init_cache(self, memory_BxSxD: jax.Array, memory_mask_BxS: jax.Array, slots: int, dtype: jnp.dtype, *,
                 ctx: layers.Context) -> encdec.Cache:
    """A decoding cache of `slots` target positions over this encoder output."""
    return encdec.new_cache(self.decoder.cross_kv(memory_BxSxD, ctx), memory_mask_BxS, slots, dtype)

  def decode_step(self, ids_BxL: jax.Array, cache: encdec.Cache, dtype: jnp.dtype, *,
                  ctx: layers.Context) -> tuple[jax.Array, encdec.Cache]:
    """(float32 logits B x L x V of the next tokens, the extended cache) for L new decoder tokens."""
    y, cache = self.decoder.step(ids_BxL, self._shared(), cache, dtype, ctx)
    return self.head(y, ctx), cache

  def __call__(self, batch: dict[str, jax.Array], *, ctx: layers.Context, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, remat: str = "none", vocab_block: int = 0) -> dict[str, Any]:
    """`logits` (B x T x V, float32) of each target position given the source (input_ids, attention_mask) and
    the target so far (decoder_input_ids, or the labels shifted right); `hidden`: the encoder output (B x S x D).
    With `vocab_block` > 0 (a loss) `logits` is a vocab.TiledHead the cross-entropy reads block by block."""
    r_enc, r_dec = layers.split_rng(dropout_rng, 2)
    memory = self.encode(batch, dtype, ctx=ctx, rng=r_enc, remat=remat)
    return {"logits": self.decode(batch, memory, dtype, ctx, r_dec, remat, vocab_block), "hidden": memory}


def hf_param_map(cfg: BartConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF BartForConditionalGeneration / MarianMTModel key, layout kind); one entry per stacked
  param."""
  m = {"final_logits.bias": ("final_logits_bias", "copy")}
  if cfg.shared:
    m["shared"] = ("model.shared.weight", "copy")
  else:
    m["encoder.embed_tokens"] = ("model.encoder.embed_tokens.weight", "copy")
    m["decoder.embed_tokens"] = ("model.decoder.embed_tokens.weight", "copy")
  if not cfg.tie_word_embeddings:
    m["lm_head.kernel"] = ("lm_head.weight", "linear")
  sublayers = {"encoder": [("attn", "attn_norm", "self_attn")],
               "decoder": [("self_attn", "self_norm", "self_attn"), ("cross_attn", "cross_norm", "encoder_attn")]}
  for stack, attentions in sublayers.items():
    if cfg.learned_positions:
      m[f"{stack}.embed_positions"] = (f"model.{stack}.embed_positions.weight", "copy")
    if cfg.layernorm_embedding:
      _norm(m, f"{stack}.layernorm_embedding", f"model.{stack}.layernorm_embedding")
    theirs = f"model.{stack}.layers.{{i}}"  # stacked: {i} runs over the N layers
    for ours, norm, hf_attention in attentions:
      for name in "qkv":
        m[f"{stack}.layers.{ours}.{name}.kernel"] = (f"{theirs}.{hf_attention}.{name}_proj.weight", "linear")
        m[f"{stack}.layers.{ours}.{name}.bias"] = (f"{theirs}.{hf_attention}.{name}_proj.bias", "flat")
      m[f"{stack}.layers.{ours}.o.kernel"] = (f"{theirs}.{hf_attention}.out_proj.weight", "linear_hk")
      m[f"{stack}.layers.{ours}.o.bias"] = (f"{theirs}.{hf_attention}.out_proj.bias", "copy")
      _norm(m, f"{stack}.layers.{norm}", f"{theirs}.{hf_attention}_layer_norm")
    for name in ("fc1", "fc2"):
      m[f"{stack}.layers.mlp.{name}.kernel"] = (f"{theirs}.{name}.weight", "linear")
      m[f"{stack}.layers.mlp.{name}.bias"] = (f"{theirs}.{name}.bias", "copy")
    _norm(m, f"{stack}.layers.mlp_norm", f"{theirs}.final_layer_norm")
  return m


def _norm(m: dict[str, tuple[str, str]], ours: str, theirs: str) -> None:
  m[f"{ours}.scale"] = (f"{theirs}.weight", "copy")
  m[f"{ours}.bias"] = (f"{theirs}.bias", "copy")


def hf_ignored_keys(cfg: BartConfig) -> tuple[str, ...]:
  """Checkpoint keys that are copies of the params under other names, Marian's fixed position tables (older
  checkpoints save them), and fairseq's version buffers."""
  keys = [r"(model\.)?(encoder|decoder)\.version"]
  if cfg.shared:  # the stacks' embed_tokens (and a tied lm_head) are model.shared
    keys.append(r"(model\.)?(encoder|decoder)\.embed_tokens\.weight")
  elif cfg.family == "bart" or cfg.share_encoder_decoder_embeddings:  # untied: model.shared is read by nothing
    keys.append(r"(model\.)?shared\.weight")
  if cfg.tie_word_embeddings:
    keys.append(r"lm_head\.weight")
  if not cfg.learned_positions:
    keys.append(r"(model\.)?(encoder|decoder)\.embed_positions\.weight")
  return tuple(keys)


def max_positions(cfg: BartConfig) -> int:
  """The longest sequence the position table holds (BART's two spare rows aside)."""
  return cfg.max_position_embeddings
