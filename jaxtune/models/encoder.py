"""BERT-style encoders (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA) with a sequence, span or token head.

One post-LN transformer covers the families; they differ in their embeddings (RoBERTa and XLM-R count
positions from the padding index + 1, DistilBERT has no token types, ELECTRA may embed in a smaller
width and project), in where dropout sits, in the sequence-classification head, and in their HF key
names. The heads follow transformers' classes, so that those import and export the weights:
`*ForSequenceClassification` (logits B x C), `*ForQuestionAnswering` (start / end logits, B x L x 2)
and `*ForTokenClassification` (logits B x L x C).

Dimensions: N layers, B batch, L length, E embedding width, D model dim, H heads, K head dim, F mlp dim,
V vocab, C classes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import UserError
from jaxtune.models import attention, layers

Head = Literal["classification", "question_answering", "token_classification"]
# HF model_type -> the attribute (and HF key prefix) of the base model in its task classes
BASE_PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert",
               "electra": "electra"}
# The task classes' names, per model_type and head (for export)
ARCHITECTURES = {
    t: {"classification": f"{name}ForSequenceClassification", "question_answering": f"{name}ForQuestionAnswering",
        "token_classification": f"{name}ForTokenClassification"}
    for t, name in {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
                    "electra": "Electra"}.items()}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  family: str = "bert"  # HF model_type, a key of BASE_PREFIX
  head: Head = "classification"
  type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
  embedding_size: int | None = None  # ELECTRA: embeddings this wide, projected to hidden_size; None = hidden_size
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None  # sequence/token heads; None: hidden_dropout_prob
  qa_dropout: float = 0.0  # DistilBERT drops the hidden states before its span head
  pad_token_id: int | None = 0  # its word embedding gets no gradient from the inputs (HF's padding_idx)
  num_labels: int = 2
  scan_layers: bool = False  # model.scan_layers: one lax.scan over the layers instead of unrolled code

  # Our dropout fields; model.dropout sets them all (and export writes them back under the family's HF names).
  DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "qa_dropout")

  @classmethod
  def from_hf(cls, hf: dict[str, Any], num_labels: int, dropout: float | None = None,
              head: Head = "classification") -> EncoderConfig:
    """Our config from an HF config.json dict; `dropout` overrides all dropout rates."""
    family = hf.get("model_type", "bert")
    if family == "distilbert":
      if hf.get("sinusoidal_pos_embds"):
        raise UserError("DistilBERT with sinusoidal_pos_embds (fixed position embeddings) is not supported; use a "
                        "checkpoint with learned positions (every released DistilBERT has them).")
      fields = {"vocab_size": hf["vocab_size"], "hidden_size": hf["dim"], "num_hidden_layers": hf["n_layers"],
                "num_attention_heads": hf["n_heads"], "intermediate_size": hf["hidden_dim"],
                "max_position_embeddings": hf["max_position_embeddings"], "type_vocab_size": 0,
                "hidden_act": hf.get("activation", "gelu"), "hidden_dropout_prob": hf.get("dropout", 0.1),
                "attention_probs_dropout_prob": hf.get("attention_dropout", 0.1),
                "classifier_dropout": hf.get("seq_classif_dropout", 0.2), "qa_dropout": hf.get("qa_dropout", 0.1),
                "pad_token_id": hf.get("pad_token_id", 0)}
    else:
      names = {f.name for f in dataclasses.fields(cls)} - {"num_labels", "family", "head", "qa_dropout"}
      fields = {k: hf[k] for k in names if k in hf}
      if family != "electra":
        fields.pop("embedding_size", None)
    cfg = cls(**fields, family=family, head=head, num_labels=2 if head == "question_answering" else num_labels)
    return cfg if dropout is None else dataclasses.replace(cfg, **dict.fromkeys(cls.DROPOUT_KEYS, dropout))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def embed_dim(self) -> int:
    return self.embedding_size or self.hidden_size

  @property
  def offset_positions(self) -> bool:
    """RoBERTa and XLM-R number positions from pad_token_id + 1, as fairseq did."""
    return self.family in ("roberta", "xlm-roberta")

  @property
  def has_pooler(self) -> bool:
    """Only BERT's sequence classifier reads the tanh pooler; the other heads and families have none."""
    return self.family == "bert" and self.head == "classification"

  @property
  def head_dropout(self) -> float:
    return self.classifier_dropout if self.classifier_dropout is not None else self.hidden_dropout_prob


class Embeddings(nnx.Module):
  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    normal = jax.nn.initializers.normal(0.02)
    e = cfg.embed_dim
    self.word = layers.param(rngs, normal, (cfg.vocab_size, e), ("vocab", "embed"))
    self.position = layers.param(rngs, normal, (cfg.max_position_embeddings, e), (None, "embed"))
    self.token_type = (layers.param(rngs, normal, (cfg.type_vocab_size, e), (None, "embed"))
                       if cfg.type_vocab_size else nnx.data(None))
    self.norm = layers.LayerNorm(e, cfg.layer_norm_eps, rngs=rngs)
    self.rate, self.padding_id, self.offset = cfg.hidden_dropout_prob, cfg.pad_token_id, cfg.offset_positions

  def __call__(self, ids_BxL: jax.Array, mask_BxL: jax.Array, types_BxL: jax.Array, dtype: jnp.dtype,
               rng: jax.Array | None, word_BxLxE: jax.Array | None = None) -> jax.Array:
    """`word_BxLxE` replaces the token embeddings' lookup (integrated gradients interpolate it)."""
    x_BxLxE = layers.lookup(self.word[...], ids_BxL, self.padding_id) if word_BxLxE is None else word_BxLxE
    if self.offset:  # real tokens at pad_token_id + 1, 2, ...; padding at pad_token_id (right padding)
      mask_BxL = mask_BxL.astype(jnp.int32)
      x_BxLxE = x_BxLxE + self.position[...][jnp.cumsum(mask_BxL, axis=1) * mask_BxL + self.padding_id]
    else:
      x_BxLxE = x_BxLxE + self.position[...][:ids_BxL.shape[1]][None]
    if self.token_type is not None:
      x_BxLxE = x_BxLxE + self.token_type[...][types_BxL]
    return layers.dropout(self.norm(x_BxLxE).astype(dtype), self.rate, rng)


class Layer(nnx.Module):
  """Post-LN transformer block: attention, add & norm, MLP, add & norm."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
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
    self.attn_out_rate = 0.0 if cfg.family == "distilbert" else cfg.hidden_dropout_prob  # DistilBERT has none there

  def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, rng: jax.Array | None,
               ctx: layers.Context, first_only: bool = False) -> jax.Array:
    """The layer's output, B x L x D; with `first_only` that of the first token alone, B x 1 x D (its query
    still attends to every key)."""
    r_attn, r_out, r_mlp = layers.split_rng(rng, 3)
    heads = ("batch", "length", "heads", "head_dim")
    if first_only:
      k, v = (ctx.constrain(y, heads) for y in layers.dense_many((self.key, self.value), x_BxLxD, ctx))
      x_BxLxD = x_BxLxD[:, :1]
      q = ctx.constrain(self.query(x_BxLxD, ctx), heads)
    else:
      q, k, v = (ctx.constrain(y, heads) for y in layers.dense_many((self.query, self.key, self.value), x_BxLxD, ctx))
    attn_BxLxHxK = attention.attend(q, k, v, ctx, attention.Mask(kv_segments=mask_BxL), None, self.attn_rate, r_attn)
    x_BxLxD = self.attn_norm(x_BxLxD + layers.dropout(self.attn_out(attn_BxLxHxK, ctx), self.attn_out_rate, r_out))
    h_BxLxF = ctx.constrain(self.act(self.mlp_in(x_BxLxD, ctx)), ("batch", "length", "mlp"))
    return self.mlp_norm(x_BxLxD + layers.dropout(self.mlp_out(h_BxLxF, ctx), self.rate, r_mlp))


class Encoder(nnx.Module):
  """Embeddings (projected to D for ELECTRA), the layer stack and, for BERT's classifier, the tanh pooler."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(cfg, rngs)
    self.project = (layers.Dense((cfg.embed_dim,), (cfg.hidden_size,), ("embed",), ("embed_out",), rngs=rngs)
                    if cfg.embed_dim != cfg.hidden_size else nnx.data(None))
    self.layers = layers.stack(lambda r: Layer(cfg, r), cfg.num_hidden_layers, rngs)
    self.num_layers, self.scan_layers = cfg.num_hidden_layers, cfg.scan_layers
    self.pooler = (layers.Dense((cfg.hidden_size,), (cfg.hidden_size,), ("embed",), ("embed_out",), rngs=rngs)
                   if cfg.has_pooler else nnx.data(None))

  def __call__(self, ids_BxL, mask_BxL, types_BxL, dtype, rng, remat, ctx: layers.Context,
               word_BxLxE=None, first_only: bool = False) -> tuple[jax.Array, Any]:
    """(last hidden states B x L x D, or B x 1 x D with `first_only`: the last layer computes the first token's
    alone; pooled [CLS] B x D or None without a pooler)."""
    rngs = None if rng is None else jax.random.split(rng, self.num_layers + 1)  # [0] embeddings, [1:] one per layer
    x_BxLxD = self.embeddings(ids_BxL, mask_BxL, types_BxL, dtype, None if rngs is None else rngs[0], word_BxLxE)
    if self.project is not None:
      x_BxLxD = self.project(x_BxLxD, ctx)

    def body(layer: Layer, x_BxLxD: jax.Array, r: jax.Array | None, ctx: layers.Context,
             first_only: bool = False) -> tuple[jax.Array, None]:
      return layer(ctx.constrain(x_BxLxD, ("batch", "length", "embed")), mask_BxL, r, ctx, first_only), None

    x_BxLxD, _ = layers.scan(self.layers, body, x_BxLxD, None if rngs is None else rngs[1:], ctx, remat,
                             unroll=not self.scan_layers,
                             last=functools.partial(body, first_only=True) if first_only else None)
    pooled_BxD = None if self.pooler is None else jnp.tanh(self.pooler(x_BxLxD[:, 0], ctx))
    return x_BxLxD, pooled_BxD


class ClassificationHead(nnx.Module):
  """RoBERTa's and ELECTRA's head on the first token: dropout, dense, tanh (ELECTRA: gelu), dropout, out_proj."""

  def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dense = layers.Dense((d,), (d,), ("embed",), ("embed_out",), rngs=rngs)
    self.out_proj = layers.Dense((d,), (cfg.num_labels,), ("embed",), ("classes",), rngs=rngs)
    self.act = layers.ACTIVATIONS["gelu"] if cfg.family == "electra" else jnp.tanh
    self.rate = cfg.head_dropout

  def __call__(self, x_BxD: jax.Array, rng: jax.Array | None, ctx: layers.Context) -> jax.Array:
    r_in, r_out = layers.split_rng(rng, 2)
    x_BxD = self.act(self.dense(layers.dropout(x_BxD, self.rate, r_in), ctx))
    return self.out_proj(layers.dropout(x_BxD, self.rate, r_out), ctx)


class EncoderModel(nnx.Module):
  """An encoder family (its base model under the HF attribute name, e.g. `bert`) with the head `cfg.head`."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.base_name = BASE_PREFIX[cfg.family]
    setattr(self, self.base_name, Encoder(cfg, rngs))  # param paths bert.*, roberta.*, ... as HF names them
    d, c = cfg.hidden_size, cfg.num_labels
    if cfg.head == "question_answering":
      self.qa_outputs = layers.Dense((d,), (2,), ("embed",), ("classes",), rngs=rngs)
    elif cfg.head == "token_classification" or cfg.family == "bert":
      self.classifier = layers.Dense((d,), (c,), ("embed",), ("classes",), rngs=rngs)
    elif cfg.family == "distilbert":
      self.pre_classifier = layers.Dense((d,), (d,), ("embed",), ("embed_out",), rngs=rngs)
      self.classifier = layers.Dense((d,), (c,), ("embed",), ("classes",), rngs=rngs)
    else:
      self.classifier = ClassificationHead(cfg, rngs)

  def __call__(self, batch: dict[str, jax.Array], *, ctx: layers.Context, dtype: jnp.dtype = jnp.float32,
               dropout_rng: jax.Array | None = None, remat: str = "none",
               all_hidden: bool = False) -> dict[str, jax.Array]:
    """`logits` (float32; B x C, B x L x 2 or B x L x C by head) and the last `hidden` states (B x L x D).

    The sequence-classification head reads the first token's last hidden state alone, so unless `all_hidden` asks
    for every token's, the last layer computes only that one (its query attends to all keys; the other tokens'
    queries, attention output and MLP, 14% of MiniLM's layer matmuls, are never computed; HF computes and drops
    them): `hidden` is then B x 1 x D. Same logits and gradients (tests/test_encoder_first_token.py).
    batch["word_embeddings"] (B x L x E), when present, stands in for the token embeddings of input_ids."""
    cfg = self.cfg
    r_enc, r_head = layers.split_rng(dropout_rng, 2)
    ids_BxL = batch["input_ids"]
    types_BxL = batch.get("token_type_ids", jnp.zeros_like(ids_BxL))
    first_only = cfg.head == "classification" and not all_hidden
    hidden_BxLxD, pooled_BxD = getattr(self, self.base_name)(ids_BxL, batch["attention_mask"], types_BxL, dtype,
                                                             r_enc, remat, ctx, batch.get("word_embeddings"),
                                                             first_only)
    if cfg.head == "question_answering":
      logits = self.qa_outputs(layers.dropout(hidden_BxLxD, cfg.qa_dropout, r_head), ctx)
    elif cfg.head == "token_classification":
      rate = cfg.hidden_dropout_prob if cfg.family == "distilbert" else cfg.head_dropout
      logits = self.classifier(layers.dropout(hidden_BxLxD, rate, r_head), ctx)
    elif cfg.family == "bert":
      logits = self.classifier(layers.dropout(pooled_BxD, cfg.head_dropout, r_head), ctx)
    elif cfg.family == "distilbert":
      logits = self.classifier(layers.dropout(jax.nn.relu(self.pre_classifier(hidden_BxLxD[:, 0], ctx)),
                                              cfg.head_dropout, r_head), ctx)
    else:
      logits = self.classifier(hidden_BxLxD[:, 0], r_head, ctx)
    return {"logits": logits.astype(jnp.float32), "hidden": hidden_BxLxD}


def hf_param_map(cfg: EncoderConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (HF key of the task class, layout kind; see weights.py); one entry per stacked param."""
  p = BASE_PREFIX[cfg.family]
  emb = f"{p}.embeddings"
  m = {f"{p}.embeddings.word": (f"{emb}.word_embeddings.weight", "copy"),
       f"{p}.embeddings.position": (f"{emb}.position_embeddings.weight", "copy"),
       f"{p}.embeddings.norm.scale": (f"{emb}.LayerNorm.weight", "copy"),
       f"{p}.embeddings.norm.bias": (f"{emb}.LayerNorm.bias", "copy")}
  if cfg.type_vocab_size:
    m[f"{p}.embeddings.token_type"] = (f"{emb}.token_type_embeddings.weight", "copy")
  if cfg.embed_dim != cfg.hidden_size:
    _dense(m, f"{p}.project", f"{p}.embeddings_project")
  if cfg.has_pooler:
    _dense(m, f"{p}.pooler", f"{p}.pooler.dense")
  if cfg.family == "distilbert":
    theirs = "distilbert.transformer.layer.{i}"
    per_layer = {"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
                 "attn_out": "attention.out_lin", "mlp_in": "ffn.lin1", "mlp_out": "ffn.lin2"}
    norms = {"attn_norm": "sa_layer_norm", "mlp_norm": "output_layer_norm"}
  else:
    theirs = f"{p}.encoder.layer.{{i}}"  # stacked: {i} runs over the N layers
    per_layer = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "mlp_in": "intermediate.dense", "mlp_out": "output.dense"}
    norms = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for name, hf_name in per_layer.items():
    out_heads = name in ("query", "key", "value")
    m[f"{p}.layers.{name}.kernel"] = (f"{theirs}.{hf_name}.weight", "linear_hk" if name == "attn_out" else "linear")
    m[f"{p}.layers.{name}.bias"] = (f"{theirs}.{hf_name}.bias", "flat" if out_heads else "copy")
  for name, hf_name in norms.items():
    m[f"{p}.layers.{name}.scale"] = (f"{theirs}.{hf_name}.weight", "copy")
    m[f"{p}.layers.{name}.bias"] = (f"{theirs}.{hf_name}.bias", "copy")
  if cfg.head == "question_answering":
    _dense(m, "qa_outputs", "qa_outputs")
  elif cfg.head == "token_classification" or cfg.family == "bert":
    _dense(m, "classifier", "classifier")
  elif cfg.family == "distilbert":
    _dense(m, "pre_classifier", "pre_classifier")
    _dense(m, "classifier", "classifier")
  else:
    _dense(m, "classifier.dense", "classifier.dense")
    _dense(m, "classifier.out_proj", "classifier.out_proj")
  return m


def _dense(m: dict[str, tuple[str, str]], ours: str, theirs: str) -> None:
  m[f"{ours}.kernel"] = (f"{theirs}.weight", "linear")
  m[f"{ours}.bias"] = (f"{theirs}.bias", "copy")


def hf_ignored_keys(cfg: EncoderConfig) -> tuple[str, ...]:
  """Checkpoint keys that are buffers, or a pooler this head does not use (the base models save one).

  Pretraining heads (BERT's cls.*, RoBERTa's lm_head.*, ...) are not listed: a config that drops them
  says so in model.unused_keys."""
  unused_pooler = () if cfg.has_pooler else (rf"({BASE_PREFIX[cfg.family]}\.)?pooler\..*",)
  return (r".*position_ids$", r".*token_type_ids$", *unused_pooler)


def max_positions(cfg: EncoderConfig) -> int:
  """The longest input the position table holds (RoBERTa and XLM-R spend pad_token_id + 1 rows on their offset)."""
  return cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.offset_positions else 0)
