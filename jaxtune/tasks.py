"""What differs between tasks: how splits are encoded and batched, the loss, and the eval metrics.

Each task gives the train/eval steps a (summed loss, target count) pair, so the loss is always
normalised by the true number of targets of the global batch: examples for classification,
response/text tokens for causal LM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

from jaxtune import metrics as metrics_lib
from jaxtune.config import Config
from jaxtune.data import batching, classification, lm, qa, seq2seq, sources, splits, stream, tagging
from jaxtune.errors import UserError


class Classification:
  """Text (pair) -> label: cross-entropy on the [CLS] head; accuracy and macro F1."""
  name = "classification"
  head = "classification"  # the model head it trains (pretrained.from_config)

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None
           ) -> tuple[list[Any], dict[str, classification.Encoded]]:
    return classification.load_splits(cfg.data, cfg.train.seed, tokenizer, names, labels, extra, limit)

  def collate(self, data: classification.Encoded, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> dict:
    return batching.collate(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len, part)

  def loss_terms(self, logits_BxC: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
    return (loss_B * batch["weights"]).sum(), batch["weights"].sum()

  def eval_outputs(self, logits_BxC: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]),
            "pred": jnp.argmax(logits_BxC, -1)}

  def metrics(self, out: dict[str, np.ndarray], data: classification.Encoded, labels: Sequence[Any],
              cfg: Config) -> dict:
    return metrics_lib.classification(out["pred"], data.labels, out["loss"], len(labels))


class QuestionAnswering:
  """Extractive QA (SQuAD form): start / end logits over each question + context window; SQuAD EM and F1."""
  name = head = "question_answering"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None) -> tuple[None, dict[str, qa.Features]]:
    del labels
    d = cfg.data
    out = {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      examples = qa.read_examples({c: ds[c] for c in ds.column_names}, name, d.id_column, d.question_column,
                                  d.context_column, d.answers_column)
      unanswered = next((e for e in examples if not e.answers), None)
      if unanswered is not None and not cfg.qa.version_2_with_negative:
        raise UserError(f"data split {name}: question {unanswered.id!r} has no answer; set "
                        "qa.version_2_with_negative: true for SQuAD v2-style data, or drop such rows.")
      out[n] = qa.featurize(examples, tokenizer, d.max_len, cfg.qa.doc_stride, name)
    return None, out

  def collate(self, data: qa.Features, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> dict:
    batch, real = batching.encoder_batch(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len, part)
    n = len(batch["weights"])
    batch["start_positions"] = batching.per_row(data.start_positions, real, n)
    batch["end_positions"] = batching.per_row(data.end_positions, real, n)
    return batch

  def _losses(self, logits_BxLx2: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(start / end logits with padding at -1e9, per-row loss: the mean of the start and end cross-entropies)."""
    logits_BxLx2 = jnp.where(batch["attention_mask"][..., None] > 0, logits_BxLx2, -1e9)
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss_B = (ce(logits_BxLx2[..., 0], batch["start_positions"]) + ce(logits_BxLx2[..., 1], batch["end_positions"]))
    return logits_BxLx2, loss_B / 2

  def loss_terms(self, logits_BxLx2: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    _, loss_B = self._losses(logits_BxLx2, batch)
    return (loss_B * batch["weights"]).sum(), batch["weights"].sum()

  def eval_outputs(self, logits_BxLx2: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits_BxLx2, loss_B = self._losses(logits_BxLx2, batch)
    return {"start_logits": logits_BxLx2[..., 0], "end_logits": logits_BxLx2[..., 1], "loss": loss_B}

  def predictions(self, out: dict[str, np.ndarray], data: qa.Features, cfg: Config) -> dict[str, str]:
    """Example id -> answer text ("" for no answer under SQuAD v2)."""
    q = cfg.qa
    return qa.best_spans(out["start_logits"], out["end_logits"], data, q.n_best, q.max_answer_len,
                         q.null_score_diff if q.version_2_with_negative else None)

  def metrics(self, out: dict[str, np.ndarray], data: qa.Features, labels: Any, cfg: Config) -> dict:
    return {**qa.squad_metrics(self.predictions(out, data, cfg), data.examples), "loss": float(np.mean(out["loss"])),
            "num_examples": len(data.examples), "num_features": len(data)}


class TokenClassification:
  """Word tags (NER, POS) on each word's first sub-token; seqeval entity precision / recall / F1, token accuracy."""
  name = head = "token_classification"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None
           ) -> tuple[list[str], dict[str, tagging.Tagged]]:
    d = cfg.data
    tokenizer = words_tokenizer(tokenizer)
    rows = {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      for column in (d.tokens_column, d.tags_column):
        if column not in ds.column_names:
          raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); set "
                          "data.tokens_column / data.tags_column to existing columns.")
      words, tags = ds[d.tokens_column], tagging.tag_names(ds[d.tags_column], ds.features.get(d.tags_column))
      tagging.check_rows(words, tags, name, d.tokens_column, d.tags_column)
      rows[n] = words, tags
    if labels is None:
      labels = tagging.label_list(rows["train"][1], splits.describe(d, "train", extra))
    return list(labels), {n: tagging.encode(w, t, tokenizer, labels, d.max_len, splits.describe(d, n, extra))
                          for n, (w, t) in rows.items()}

  def collate(self, data: tagging.Tagged, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> dict:
    batch, real = batching.encoder_batch(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len, part)
    batch["labels"] = np.full(batch["input_ids"].shape, tagging.IGNORE, np.int32)
    for i, r in enumerate(real):
      batch["labels"][i, :len(data.labels[r])] = data.labels[r]
    return batch

  def _losses(self, logits_BxLxC: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(per-token loss, 1 where a token carries a label)."""
    valid_BxL = batch["labels"] != tagging.IGNORE
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxC, jnp.where(valid_BxL, batch["labels"], 0))
    return loss_BxL * valid_BxL, valid_BxL.astype(jnp.float32)

  def loss_terms(self, logits_BxLxC: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    loss_BxL, valid_BxL = self._losses(logits_BxLxC, batch)
    return loss_BxL.sum(), valid_BxL.sum()

  def eval_outputs(self, logits_BxLxC: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    loss_BxL, valid_BxL = self._losses(logits_BxLxC, batch)
    return {"pred": jnp.argmax(logits_BxLxC, -1), "loss_sum": loss_BxL.sum(-1), "tokens": valid_BxL.sum(-1)}

  def metrics(self, out: dict[str, np.ndarray], data: tagging.Tagged, labels: Sequence[str], cfg: Config) -> dict:
    loss = float(out["loss_sum"].sum()) / max(float(out["tokens"].sum()), 1.0)
    return {**tagging.metrics(list(out["pred"]), data, labels), "loss": loss}


def words_tokenizer(tokenizer: Any) -> Any:
  """A tokenizer that takes pre-split words: byte-level BPE ones (RoBERTa's) need add_prefix_space=True, which
  can only be set when loading (transformers' run_ner.py does the same)."""
  if getattr(tokenizer, "add_prefix_space", None) is False:
    return transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_prefix_space=True)
  return tokenizer


class TokenLoss:
  """Cross-entropy per target token (`TARGETS`, weighted by `MASK`), normalised by the true token count; eval
  metrics loss and perplexity. Shared by the causal LM and seq2seq tasks, which name the two batch fields."""
  TARGETS: str
  MASK: str

  def loss_terms(self, logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch[self.TARGETS])
    return (loss_BxL * batch[self.MASK]).sum(), batch[self.MASK].sum()

  def eval_outputs(self, logits_BxLxV: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch[self.TARGETS])
    return {"loss_sum": (loss_BxL * batch[self.MASK]).sum(-1), "tokens": batch[self.MASK].sum(-1)}

  def metrics(self, out: dict[str, np.ndarray], data: Any, labels: Any, cfg: Config) -> dict:
    tokens = float(out["tokens"].sum())
    loss = float(out["loss_sum"].sum()) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": int(tokens),
            "num_examples": len(data)}


class CausalLM(TokenLoss):
  """Next-token prediction on text, prompt/response or chat rows; loss and perplexity per target token."""
  name = "causal_lm"
  head = "causal_lm"
  TARGETS, MASK = "targets", "loss_mask"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None) -> tuple[None, dict[str, lm.LMExamples]]:
    del labels
    d = cfg.data
    raw = splits.load_raw(d, cfg.train.seed, names, extra, limit)
    raw = {n: with_prompts(ds, cfg, splits.describe(d, n, extra)) for n, ds in raw.items()}
    return None, {n: lm.load_lm_split(raw[n], tokenizer, splits.describe(d, n, extra), d.max_len,
                                      **dataclasses.asdict(self.form(cfg)))
                  for n in names}

  def form(self, cfg: Config) -> lm.Form:
    d = cfg.data
    return lm.Form(text_column=None if (d.response_column or d.messages_column) else d.text_column,
                   prompt_column=PROMPT if d.response_column else None, response_column=d.response_column,
                   messages_column=d.messages_column, use_chat_template=d.use_chat_template, pack_text=d.pack)

  def stream(self, cfg: Config, tokenizer: Any) -> stream.LMStream:
    """The train split read lazily (data.streaming): windows of rows encoded as `load` would encode them."""
    d, form = cfg.data, self.form(cfg)
    name = splits.describe(d, "train")
    open_source = functools.partial(sources.load_split, d.train, d.text_unit, streaming=True)
    open_source()  # a bad spec or unreadable file fails here, before anything is written

    def encode(rows: list[dict[str, Any]], where: str) -> list[lm.Example]:
      ds = with_prompts(datasets.Dataset.from_list(rows), cfg, where)
      form.check_columns(ds.column_names, where)
      return form.encode({c: ds[c] for c in form.columns}, tokenizer, d.max_len, where)

    return stream.LMStream(open_source, encode, d.max_len, cfg.train.batch_size, cfg.train.seed,
                           d.stream_shuffle_window, form.packs, name)

  def collate(self, data: lm.LMExamples, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> dict:
    return lm.collate(data, rows, batch_size, cfg.data.length_buckets, part)



class Seq2Seq(TokenLoss):
  """Source text -> target text with an encoder-decoder: teacher-forced loss per target token, perplexity."""
  name = head = "seq2seq"
  TARGETS, MASK = "labels", "label_mask"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None) -> tuple[None, dict[str, seq2seq.Pairs]]:
    del labels
    d = cfg.data
    out = {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      if "." in d.source_column + d.target_column:  # WMT's {"translation": {"en": ..., "ro": ...}}: translation.en
        ds = ds.flatten()
      for column in (d.source_column, d.target_column):
        if column not in ds.column_names:
          raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); set "
                          "data.source_column / data.target_column to existing columns.")
      out[n] = seq2seq.encode(ds[d.source_column], ds[d.target_column], tokenizer, d.source_prefix, d.max_len,
                              d.max_target_len, name)
    return None, out

  def collate(self, data: seq2seq.Pairs, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> dict:
    return seq2seq.collate(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len,
                           cfg.data.max_target_len, part)



PROMPT = "prompt"  # the column prompts are read from once `with_prompts` has run


def with_prompts(ds: datasets.Dataset, cfg: Config, name: str) -> datasets.Dataset:
  """`ds` with its prompts in column PROMPT: data.prompt_column copied, or data.prompt_template filled."""
  d = cfg.data
  if d.prompt_template is not None:
    try:
      prompts = [d.prompt_template.format(**row) for row in ds]
    except (KeyError, ValueError, IndexError) as e:
      raise UserError(f"data.prompt_template does not fit split {name} ({type(e).__name__}: {e}); use "
                      f"{{column}} fields of {ds.column_names}.") from None
  elif d.prompt_column is not None:
    if d.prompt_column not in ds.column_names:
      raise UserError(f"data split {name} has no column {d.prompt_column!r} (it has {ds.column_names}); set "
                      "data.prompt_column to an existing column.")
    prompts = ds[d.prompt_column]
  else:
    return ds
  return ds.remove_columns([c for c in (PROMPT,) if c in ds.column_names]).add_column(PROMPT, list(prompts))


TASKS = {"classification": Classification(), "question_answering": QuestionAnswering(),
         "token_classification": TokenClassification(), "causal_lm": CausalLM(), "seq2seq": Seq2Seq()}
