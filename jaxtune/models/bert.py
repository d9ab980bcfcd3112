"""BERT encoder with a sequence-classification head, loadable from HF BertModel checkpoints.

Dimensions: N layers, B batch, L length, D model dim, H heads, K head dim, F mlp dim, V vocab, C classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune import sharding
from jaxtune.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  pad_token_id: int | None = 0  # its word embedding gets no gradient from the inputs (HF's padding_idx)
  num_labels: int = 2
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code

  # The HF config keys of every dropout rate (our fields carry the same names); model.dropout sets them all.
  DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int, dropout: float | None = None) -> BertConfig:
    """Our config from an HF config.json dict; `dropout` overrides all dropout rates."""
    names = {f.name for f in dataclasses.fields(cls)} - {"num_labels"}
    cfg = cls(**{k: hf[k] for k in names if k in hf}, num_labels=num_labels)
    return cfg if dropout is None else dataclasses.replace(cfg, **dict.fromkeys(cls.DROPOUT_KEYS, dropout))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class Embeddings(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal(0.02)
    self.word = layers.param(rngs, normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    self.position = layers.param(rngs, normal, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"))
    self.token_type = layers.param(rngs, normal, (cfg.type_vocab_size, cfg.hidden_size), (None, "embed"))
    self.norm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
    self.rate, self.padding_id = cfg.hidden_dropout_prob, cfg.pad_token_id

  def __call__(self, ids_BxL: jax.Array, types_BxL: jax.Array, dtype: jnp.dtype, rng: jax.Array | None,
               word_BxLxD: jax.Array | None = None):
    """`word_BxLxD` replaces the token embeddings' lookup (integrated gradients interpolate it)."""
    length = ids_BxL.shape[1]
    x_BxLxD = layers.lookup(self.word[...], ids_BxL, self.padding_id) if word_BxLxD is None else word_BxLxD
    x_BxLxD = x_BxLxD + self.position[...][:length][None] + self.token_type[...][types_BxL]
    return layers.dropout(self.norm(x_BxLxD).astype(dtype), self.rate, rng)


class Layer(nnx.Module):
  """Post-LN transformer block: attention, add & norm, MLP, add & norm."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d, h, k, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    self.query = layers.Dense((d,), (h, k), ("embed",), ("heads", "head_dim"), rngs=rngs)
    self.key = layers.Dense((d,), (h, k), ("embed",), ("heads", "head_dim"), rngs=rngs)
    self.value = layers.Dense((d,), (h, k), ("embed",), ("heads", "head_dim"), rngs=rngs)
    self.attn_out = layers.Dense((h, k), (d,), ("heads", "head_dim"), ("embed",), rngs=rngs)
    self.attn_norm = layers.LayerNorm(d, cfg.layer_norm_eps, rngs=rngs)
    self.mlp_in = layers.Dense((d,), (f,), ("embed",), ("mlp",), rngs=rngs)
    self.mlp_out = layers.Dense((f,), (d,), ("mlp",), ("embed",), rngs=rngs)
    self.mlp_norm = layers.LayerNorm(d, cfg.layer_norm_eps, rngs=rngs)
    self.act = layers.ACTIVATIONS[cfg.hidden_act]
    self.rate, self.attn_rate = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob

  def __call__(self, x_BxLxD: jax.Array, bias_Bx1x1xL: jax.Array, rng: jax.Array | None) -> jax.Array:
    r_attn, r_out, r_mlp = layers.split_rng(rng, 3)
    heads = ("batch", "length", "heads", "head_dim")
    q, k, v = (sharding.constrain(y, heads) for y in layers.dense_many((self.query, self.key, self.value), x_BxLxD))
    ctx_BxLxHxK = layers.dot_product_attention(q, k, v, bias_Bx1x1xL, self.attn_rate, r_attn)
    x_BxLxD = self.attn_norm(x_BxLxD + layers.dropout(self.attn_out(ctx_BxLxHxK), self.rate, r_out))
    h_BxLxF = sharding.constrain(self.act(self.mlp_in(x_BxLxD)), ("batch", "length", "mlp"))
    return self.mlp_norm(x_BxLxD + layers.dropout(self.mlp_out(h_BxLxF), self.rate, r_mlp))


class Encoder(nnx.Module):
  """Embeddings, the layer stack and the tanh pooler over the first ([CLS]) token."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(cfg, rngs)
    self.layers = layers.stack(lambda r: Layer(cfg, r), cfg.num_hidden_layers, rngs)
    self.num_layers, self.scan_layers = cfg.num_hidden_layers, cfg.scan_layers
    self.pooler = layers.Dense((cfg.hidden_size,), (cfg.hidden_size,), ("embed",), ("embed_out",), rngs=rngs)

  def __call__(self, ids_BxL, mask_BxL, types_BxL, dtype, rng, remat, word_BxLxD=None) -> tuple[jax.Array, jax.Array]:
    rngs = None if rng is None else jax.random.split(rng, self.num_layers + 1)  # [0] embeddings, [1:] one per layer
    x_BxLxD = self.embeddings(ids_BxL, types_BxL, dtype, None if rngs is None else rngs[0], word_BxLxD)
    bias_Bx1x1xL = layers.attention_bias(mask_BxL, jnp.float32)

    def body(layer: Layer, x_BxLxD: jax.Array, r: jax.Array | None) -> tuple[jax.Array, None]:
      return layer(sharding.constrain(x_BxLxD, ("batch", "length", "embed")), bias_Bx1x1xL, r), None

    x_BxLxD, _ = layers.scan(self.layers, body, x_BxLxD, None if rngs is None else rngs[1:], remat,
                               unroll=not self.scan_layers)
    pooled_BxD = jnp.tanh(self.pooler(x_BxLxD[:, 0]))
    return x_BxLxD, pooled_BxD


class BertClassifier(nnx.Module):
  """BERT encoder + dropout + linear head over the pooled [CLS] vector."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.bert = Encoder(cfg, rngs)
    self.classifier = layers.Dense((cfg.hidden_size,), (cfg.num_labels,), ("embed",), ("classes",), rngs=rngs)

  def __call__(self, batch: dict[str, jax.Array], *, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, remat: str = "none") -> dict[str, jax.Array]:
    """Returns `logits` (B x C, float32) and the last `hidden` states (B x L x D).

    batch["word_embeddings"] (B x L x D), when present, stands in for the token embeddings of input_ids."""
    r_enc, r_head = layers.split_rng(dropout_rng, 2)
    ids_BxL = batch["input_ids"]
    types_BxL = batch.get("token_type_ids", jnp.zeros_like(ids_BxL))
    hidden_BxLxD, pooled_BxD = self.bert(ids_BxL, batch["attention_mask"], types_BxL, dtype, r_enc, remat,
                                         batch.get("word_embeddings"))
    rate = self.cfg.classifier_dropout if self.cfg.classifier_dropout is not None else self.cfg.hidden_dropout_prob
    logits_BxC = self.classifier(layers.dropout(pooled_BxD, rate, r_head))
    return {"logits": logits_BxC.astype(jnp.float32), "hidden": hidden_BxLxD}


def hf_param_map(cfg: BertConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF BertForSequenceClassification key, layout kind; see weights.py)."""
  del cfg  # one entry per stacked param, whatever the depth
  m = {
      "bert.embeddings.word": ("bert.embeddings.word_embeddings.weight", "copy"),
      "bert.embeddings.position": ("bert.embeddings.position_embeddings.weight", "copy"),
      "bert.embeddings.token_type": ("bert.embeddings.token_type_embeddings.weight", "copy"),
      "bert.embeddings.norm.scale": ("bert.embeddings.LayerNorm.weight", "copy"),
      "bert.embeddings.norm.bias": ("bert.embeddings.LayerNorm.bias", "copy"),
      "bert.pooler.kernel": ("bert.pooler.dense.weight", "linear"),
      "bert.pooler.bias": ("bert.pooler.dense.bias", "copy"),
      "classifier.kernel": ("classifier.weight", "linear"),
      "classifier.bias": ("classifier.bias", "copy"),
  }
  per_layer = {
      "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
      "attn_out": "attention.output.dense", "mlp_in": "intermediate.dense", "mlp_out": "output.dense",
  }
  norms = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  ours, theirs = "bert.layers", "bert.encoder.layer.{i}"  # stacked: {i} runs over the N layers
  for name, hf_name in per_layer.items():
    out_heads = name in ("query", "key", "value")
    m[f"{ours}.{name}.kernel"] = (f"{theirs}.{hf_name}.weight", "linear_hk" if name == "attn_out" else "linear")
    m[f"{ours}.{name}.bias"] = (f"{theirs}.{hf_name}.bias", "flat" if out_heads else "copy")
  for name, hf_name in norms.items():
    m[f"{ours}.{name}.scale"] = (f"{theirs}.{hf_name}.weight", "copy")
    m[f"{ours}.{name}.bias"] = (f"{theirs}.{hf_name}.bias", "copy")
  return m


# Checkpoint keys that are buffers, not parameters (pretraining heads such as cls.* are not listed:
# a config that drops them says so in model.unused_keys).
HF_BUFFER_KEYS = (r".*position_ids$",)
# HF base-model checkpoints (BertModel) store keys without this prefix.
HF_BASE_PREFIX = "bert."
