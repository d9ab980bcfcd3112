"""The encoders' token-level tasks: extractive question answering (start / end of a span) and token
classification (a tag per word)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

from jaxtune.config import Config
from jaxtune.data import batching, cache, hostrows, origin, qa, splits, tagging
from jaxtune.errors import UserError
from jaxtune.tasks import metrics
from jaxtune.tasks.base import Batch, Task


class QuestionAnswering(Task):
  """Extractive QA (SQuAD form): start / end logits over each question + context window; SQuAD EM and F1."""
  name = head = "question_answering"

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    return "f1", "max"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None,
           per_host: bool = False) -> tuple[None, dict[str, qa.Features]]:
    del labels, per_host  # the number of windows (rows) is known only once every context is tokenised
    d = cfg.data
    parts = {"task": self.name, "tokenizer": cache.tokenizer_digest(tokenizer), "data": cache.data_fields(d),
             "doc_stride": cfg.qa.doc_stride, "code": cache.code_digest("jaxtune.data.qa", "jaxtune.data.rows")
             } if d.cache_dir else {}
    out = {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      read = lambda ds, name=name: qa.read_examples({c: ds[c] for c in ds.column_names}, name, d.id_column,
                                                     d.question_column, d.context_column, d.answers_column)
      examples = read(ds)
      unanswered = next((i for i, e in enumerate(examples) if not e.answers), None)
      if unanswered is not None and not cfg.qa.version_2_with_negative:
        raise UserError(f"data split {origin.at(name, unanswered)}: question {examples[unanswered].id!r} has no "
                        "answer; set qa.version_2_with_negative: true for SQuAD v2-style data, or drop such rows.")
      # One piece: each window names its example by position in the split.
      encode = lambda rows, name=name, read=read: qa.featurize(examples if rows is ds else read(rows), tokenizer,
                                                               d.max_len, cfg.qa.doc_stride, name)
      out[n] = cache.load(d.cache_dir, parts, ds, encode, name, chunked=False)
    return None, out

  def collate(self, data: qa.Features, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
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

  def metrics(self, out: dict[str, np.ndarray], data: qa.Features, labels: Any, cfg: Config) -> dict[str, Any]:
    return {**metrics.squad(self.predictions(out, data, cfg), data.examples), "loss": float(np.mean(out["loss"])),
            "num_examples": len(data.examples), "num_features": len(data)}


class TokenClassification(Task):
  """Word tags (NER, POS) on each word's first sub-token; seqeval entity precision / recall / F1, token accuracy."""
  name = head = "token_classification"

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    return "f1", "max"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None, per_host: bool = False
           ) -> tuple[list[str], dict[str, tagging.Tagged | hostrows.Rows]]:
    d = cfg.data
    tokenizer = words_tokenizer(tokenizer)
    rows, names_of, datasets_of = {}, {}, {}
    for n, (name, ds) in splits.load_named(d, cfg.train.seed, names, extra, limit).items():
      for column in (d.tokens_column, d.tags_column):
        if column not in ds.column_names:
          raise UserError(f"data split {name} has no column {column!r} (it has {ds.column_names}); set "
                          "data.tokens_column / data.tags_column to existing columns.")
      words, tags = ds[d.tokens_column], tagging.tag_names(ds[d.tags_column], ds.features.get(d.tags_column))
      tagging.check_rows(words, tags, name, d.tokens_column, d.tags_column)
      rows[n], names_of[n], datasets_of[n] = (words, tags), name, ds
    if labels is None:
      labels = tagging.label_list(rows["train"][1], splits.describe(d, "train", extra))
    parts = {"task": self.name, "tokenizer": cache.tokenizer_digest(tokenizer), "data": cache.data_fields(d),
             "labels": list(labels), "code": cache.code_digest("jaxtune.data.tagging", "jaxtune.data.rows", __name__)
             } if d.cache_dir else {}

    def encoded(n: str) -> Any:
      ds, name = datasets_of[n], names_of[n]
      words_tags = lambda part: (part[d.tokens_column], tagging.tag_names(part[d.tags_column],
                                                                           ds.features.get(d.tags_column)))
      encode = lambda part: tagging.encode(*words_tags(part), tokenizer, labels, d.max_len, name)
      return cache.load(d.cache_dir, parts, ds, encode, name, per_host and n == "train")

    return list(labels), {n: encoded(n) for n in rows}

  def collate(self, data: tagging.Tagged, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
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

  def metrics(self, out: dict[str, np.ndarray], data: tagging.Tagged, labels: Sequence[str],
              cfg: Config) -> dict[str, Any]:
    loss = float(out["loss_sum"].sum()) / max(float(out["tokens"].sum()), 1.0)
    return {**metrics.entities(list(out["pred"]), data, labels), "loss": loss}


def words_tokenizer(tokenizer: Any) -> Any:
  """A tokenizer that takes pre-split words: byte-level BPE ones (RoBERTa's) need add_prefix_space=True, which
  can only be set when loading (transformers' run_ner.py does the same)."""
  if getattr(tokenizer, "add_prefix_space", None) is False:
    return transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_prefix_space=True)
  return tokenizer
