"""The Task protocol: what a task decides, so that the train and eval steps need not know which task runs.

Every task gives the steps a (summed loss, target count) pair, so the loss is always normalised by the
true number of targets of the global batch: examples for classification, answer windows for QA, tagged
words for NER, target tokens for the causal LM and seq2seq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import jax
import numpy as np

from jaxtune.config import Config
from jaxtune.errors import UserError
from jaxtune.models.model import Model
from jaxtune.params import Params

Batch = dict[str, np.ndarray]  # one collated batch, B rows first in every array


class Task(Protocol):
  """One task: how its splits are encoded and batched, its loss, eval outputs and metrics, the model head it
  trains, and the validation metric that picks the best checkpoint when the config names none."""
  name: str  # the config's `task`
  head: str  # the model head it trains (weights/pretrained.from_config)
  # Whether loss_terms and eval_outputs also take a models.vocab.TiledHead for the logits (the language-model
  # tasks), so the steps may ask the model for one instead of B x L x V logits (train.steps.loss_vocab_block).
  tiles_vocab: bool = False

  def configured(self, cfg: Config) -> Task:
    """This task with what it reads of `cfg` in its jitted methods (preference: beta, the loss); most read none."""
    return self

  def best(self, cfg: Config) -> tuple[str, Literal["max", "min"]]:
    """The validation metric that picks the best checkpoint when checkpoint.best_metric is unset, and whether
    larger is better."""
    ...

  def load(self, cfg: Config, tokenizer: Any, names: Sequence[str], labels: Sequence[Any] | None = None,
           extra: dict[str, str] | None = None, limit: int | None = None,
           per_host: bool = False) -> tuple[list[Any] | None, dict[str, Any]]:
    """(labels, split name -> encoded rows); `labels` given keeps the training run's label list.

    With `per_host` (a multi-process run) the train split may come as a data.hostrows.Rows, read but not
    tokenised, where each of its rows is one example; a task whose rows depend on the whole split (QA's
    windows, packed text) encodes it whole as without."""
    ...

  def collate(self, data: Any, rows: np.ndarray, batch_size: int, cfg: Config, part: slice = slice(None)) -> Batch:
    """The batch of `rows` padded to `batch_size` rows; only rows `part` (this process's share) are built."""
    ...

  def loss_terms(self, logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """(loss summed over the batch's targets, their count), and optionally a dict of further sums over the same
    targets that the train step logs as their means (preference: TRL's reward metrics)."""
    ...

  def eval_outputs(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-row outputs of the eval step (losses, predictions), computed on the devices."""
    ...

  def metrics(self, out: dict[str, np.ndarray], data: Any, labels: Any, cfg: Config) -> dict[str, Any]:
    """The split's metrics from every row's eval outputs (in data order)."""
    ...

  def predictions(self, out: dict[str, np.ndarray], data: Any, cfg: Config) -> Any:
    """What evaluate.py writes beside the metrics (QA: example id -> answer text); None for most tasks."""
    return None

  def generate(self, model: Model, params: Params, data: Any, cfg: Config,
               tokenizer: Any) -> tuple[dict[str, Any], Any]:
    """(metrics, predictions) of the model's generations on `data`, where the task scores generated text
    (seq2seq with generate.predict_with_generate: BLEU and ROUGE); ({}, None) where it does not."""
    return {}, None

  def stream(self, cfg: Config, tokenizer: Any) -> Any:
    """The train split read lazily (data.streaming), for the tasks that support it."""
    raise UserError(f"data.streaming is not supported for task {self.name}; set it false.")
