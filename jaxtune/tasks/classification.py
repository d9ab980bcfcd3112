"""Text (or text pair) classification on the encoders' sequence head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune.config import Config
from jaxtune.data import batching, classification
from jaxtune.tasks import metrics
from jaxtune.tasks.base import Batch, Task


class Classification(Task):
  """Text (pair) -> label: cross-entropy on the [CLS] head; accuracy and macro F1."""
  name = head = "classification"

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    return "accuracy", "max"

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None, per_host: bool = False
           ) -> tuple[list[Any], dict[str, classification.Encoded]]:
    return classification.load_splits(cfg.data, cfg.train.seed, tokenizer, names, labels, extra, limit, per_host)

  def collate(self, data: classification.Encoded, rows: np.ndarray, batch_size: int, cfg: Config,
              part: slice = slice(None)) -> Batch:
    return batching.collate(data, rows, batch_size, cfg.data.length_buckets, cfg.data.max_len, part)

  def loss_terms(self, logits_BxC: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
    return (loss_B * batch["weights"]).sum(), batch["weights"].sum()

  def eval_outputs(self, logits_BxC: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"]),
            "pred": jnp.argmax(logits_BxC, -1)}

  def metrics(self, out: dict[str, np.ndarray], data: classification.Encoded, labels: Sequence[Any],
              cfg: Config) -> dict[str, Any]:
    return metrics.classification(out["pred"], data.labels, out["loss"], len(labels))
