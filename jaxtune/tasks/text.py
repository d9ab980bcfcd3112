"""The text-to-text tasks: causal-LM fine-tuning (plain text, prompt/response or chat rows) and seq2seq
(source -> target with an encoder-decoder); both train on a cross-entropy per target token."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.config import Config
from jaxtune.data import cache, hostrows, lm, origin, seq2seq, sources, splits, stream
from jaxtune.errors import UserError
from jaxtune.generation import search
from jaxtune.generation import seq2seq as seq2seq_generation
from jaxtune.models import vocab
from jaxtune.models.model import Model
from jaxtune.params import Params
from jaxtune.tasks import metrics
from jaxtune.tasks.base import Batch, Task


class TokenLoss:
  """Cross-entropy per target token (`TARGETS`, weighted by `MASK`), normalised by the true token count; eval
  metrics loss and perplexity. Shared by the causal LM and seq2seq tasks, which name the two batch fields.

  The logits may come as a vocab.TiledHead (large vocabularies, see train.steps.loss_vocab_block): the
  cross-entropy is then computed a vocabulary block at a time, equal to the plain one; nothing here needs
  the logits themselves (no argmax), so evaluation takes the same path."""
  TARGETS: str
  MASK: str
  tiles_vocab = True

  def token_losses(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> jax.Array:
    """float32 B x L cross-entropy of every target token (masked ones included)."""
    if isinstance(logits, vocab.TiledHead):
      return logits.token_losses(batch[self.TARGETS])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[self.TARGETS])

  def loss_terms(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return (self.token_losses(logits, batch) * batch[self.MASK]).sum(), batch[self.MASK].sum()

  def eval_outputs(self, logits: jax.Array | vocab.TiledHead, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    loss_BxL = self.token_losses(logits, batch)
    return {"loss_sum": (loss_BxL * batch[self.MASK]).sum(-1), "tokens": batch[self.MASK].sum(-1)}

  def metrics(self, out: dict[str, np.ndarray], data: Any, labels: Any, cfg: Config) -> dict[str, Any]:
    tokens = float(out["tokens"].sum())
    loss = float(out["loss_sum"].sum()) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": int(tokens),
            "num_examples": len(data)}


class CausalLM(TokenLoss, Task):
  """Next-token prediction on text, prompt/response or chat rows; loss and perplexity per target token."""
  name = head = "causal_lm"
  TARGETS, MASK = "targets", "loss_mask"

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    return "loss", "min"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None,
           per_host: bool = False) -> tuple[None, dict[str, lm.LMExamples | hostrows.Rows]]:
    del labels
    d, form = cfg.data, self.form(cfg)
    named = splits.load_rows(d, cfg.train.seed, names, extra, limit)  # split -> (its name for row errors, rows)
    raw = {n: with_prompts(ds, cfg, name) for n, (name, ds) in named.items()}

    def encoded(n: str) -> Any:
      name = named[n][0]
      whole = functools.partial(lm.load_lm_split, tokenizer=tokenizer, name=name, seq_len=d.max_len,
                                cache_dir=d.cache_dir, **dataclasses.asdict(form))
      if per_host and n == "train" and not form.packs:  # packed rows depend on every earlier document's length
        lm.check_split(raw[n], form, name)
        encode = lambda ds: lm.pad_rows(form.encode({c: ds[c] for c in form.columns}, tokenizer, d.max_len, name),
                                        d.max_len)
        return hostrows.Rows(len(raw[n]), lambda rows: encode(raw[n].select(rows)), lambda: whole(raw[n]))
      return whole(raw[n])

    return None, {n: encoded(n) for n in names}

  def form(self, cfg: Config) -> lm.Form:
    d = cfg.data
    return lm.Form(text_column=None if (d.response_column or d.messages_column) else d.text_column,
                   prompt_column=PROMPT if d.response_column else None, response_column=d.response_column,
                   messages_column=d.messages_column, use_chat_template=d.use_chat_template, pack_text=d.pack)

  def stream(self, cfg: Config, tokenizer: Any) -> stream.LMStream:
    """The train split read lazily (data.streaming): windows of rows encoded as `load` would encode them."""
    d, form = cfg.data, self.form(cfg)
    name = origin.named(splits.describe(d, "train"), origin.Origin.of(d.train, d.text_unit))  # for row errors
    open_source = functools.partial(sources.load_split, d.train, d.text_unit, streaming=True)
    open_source()  # a bad spec or unreadable file fails here, before anything is written

    def encode(rows: list[dict[str, Any]], where: str) -> list[lm.Example]:
      ds = with_prompts(datasets.Dataset.from_list(rows), cfg, where)
      form.check_columns(ds.column_names, where)
      return form.encode({c: ds[c] for c in form.columns}, tokenizer, d.max_len, where)

    return stream.LMStream(open_source, encode, d.max_len, cfg.train.batch_size, cfg.train.seed,
                           d.stream_shuffle_window, form.packs, name)

  def collate(self, data: lm.LMExamples, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
    return lm.collate(data, rows, batch_size, cfg.data.length_buckets, part)



class Seq2Seq(TokenLoss, Task):
  """Source text -> target text with an encoder-decoder: teacher-forced loss per target token, perplexity."""
  name = head = "seq2seq"
  TARGETS, MASK = "labels", "label_mask"

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    """BLEU of the generated targets (generate.predict_with_generate), else the loss."""
    return ("bleu", "max") if cfg.generate.predict_with_generate else ("loss", "min")

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None,
           per_host: bool = False) -> tuple[None, dict[str, seq2seq.Pairs | hostrows.Rows]]:
    del labels
    d = cfg.data
    parts = {"task": self.name, "tokenizer": cache.tokenizer_digest(tokenizer), "data": cache.data_fields(d),
             "code": cache.code_digest("jaxtune.data.seq2seq", "jaxtune.data.rows")} if d.cache_dir else {}
    out = {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      if "." in d.source_column + d.target_column:  # WMT's {"translation": {"en": ..., "ro": ...}}: translation.en
        ds = ds.flatten()
      for column in (d.source_column, d.target_column):
        if column not in ds.column_names:
          raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); set "
                          "data.source_column / data.target_column to existing columns.")
      encode = functools.partial(_encode_pairs, tokenizer=tokenizer, cfg=d, name=name)
      out[n] = cache.load(d.cache_dir, parts, ds, encode, name, per_host and n == "train", cache.STATS)
    return None, out

  def collate(self, data: seq2seq.Pairs, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
    return seq2seq.collate(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len,
                           cfg.data.max_target_len, part)

  def generate(self, model: Model, params: Params, data: seq2seq.Pairs, cfg: Config,
               tokenizer: Any) -> tuple[dict[str, Any], list[dict[str, str]] | None]:
    """With generate.predict_with_generate: (BLEU, ROUGE-1/2/L and the mean generated length; source / reference
    / prediction rows) of generating a target for every source, eval_batch_size sources at a time."""
    if not cfg.generate.predict_with_generate:
      return {}, None
    rules = seq2seq_generation.rules_for(model, cfg.model)
    s = search.Search.from_config(cfg.generate)
    dtype = jnp.dtype(cfg.model.compute_dtype)
    outputs = []
    for i in range(0, len(data), cfg.train.eval_batch_size):
      chunk = data.input_ids[i:i + cfg.train.eval_batch_size]
      outputs += seq2seq_generation.generate(model, params, chunk, rules, s, jax.random.key(cfg.train.seed + i), dtype)
    texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
    scores = {"bleu": metrics.bleu(texts, data.references), **metrics.rouge(texts, data.references),
              "generated_length": sum(len(out) for out in outputs) / max(len(outputs), 1)}
    rows = [{"source": src, "reference": ref, "prediction": text}
            for src, ref, text in zip(data.sources, data.references, texts, strict=True)]
    return scores, rows


def _encode_pairs(ds: Any, tokenizer: Any, cfg: Any, name: str) -> seq2seq.Pairs:
  """The source / target pairs of a split's rows `ds` (data.source_column -> data.target_column)."""
  return seq2seq.encode(ds[cfg.source_column], ds[cfg.target_column], tokenizer, cfg.source_prefix, cfg.max_len,
                        cfg.max_target_len, name)


PROMPT = "prompt"  # the column prompts are read from once `with_prompts` has run


def with_prompts(ds: datasets.Dataset, cfg: Config, name: str) -> datasets.Dataset:
  """`ds` with its prompts in column PROMPT: data.prompt_column copied, or data.prompt_template filled."""
  d = cfg.data
  if d.prompt_template is not None:
    prompts = []
    for row, values in enumerate(ds):
      try:
        prompts.append(d.prompt_template.format(**values))
      except (KeyError, ValueError, IndexError, TypeError) as e:  # TypeError: a format spec a value has not
        raise UserError(f"data.prompt_template does not fit split {origin.at(name, row)} ({type(e).__name__}: {e}); "
                        f"use {{column}} fields of {ds.column_names}.") from None
  elif d.prompt_column is not None:
    if d.prompt_column not in ds.column_names:
      raise UserError(f"data split {name} has no column {d.prompt_column!r} (it has {ds.column_names}); set "
                      "data.prompt_column to an existing column.")
    prompts = ds[d.prompt_column]
  else:
    return ds
  return ds.remove_columns([c for c in (PROMPT,) if c in ds.column_names]).add_column(PROMPT, list(prompts))
