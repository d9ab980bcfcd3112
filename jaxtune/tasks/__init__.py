"""The tasks jaxtune fine-tunes for, one module each, and the default best checkpoint metric they give.

A task (base.Task) owns what differs between them: how its splits are encoded and batched, its loss,
its eval outputs and metrics (metrics.py), the model head it trains and its best-checkpoint metric.
"""

from __future__ import annotations

import dataclasses

from jaxtune.config import CheckpointConfig, Config
from jaxtune.tasks.base import Task
from jaxtune.tasks.classification import Classification
from jaxtune.tasks.spans import QuestionAnswering, TokenClassification
from jaxtune.tasks.text import CausalLM, Seq2Seq

TASKS: dict[str, Task] = {"classification": Classification(), "question_answering": QuestionAnswering(),
                          "token_classification": TokenClassification(), "causal_lm": CausalLM(),
                          "seq2seq": Seq2Seq()}


def checkpoint_config(cfg: Config) -> CheckpointConfig:
  """cfg.checkpoint with the task's best metric (and its direction) where the config leaves them unset."""
  task = TASKS[cfg.task]
  ckpt = cfg.checkpoint
  metric = task.best_metric if ckpt.best_metric is None else ckpt.best_metric
  mode = ckpt.best_mode or (task.best_mode if metric == task.best_metric else "min" if metric in MINIMISED else "max")
  return dataclasses.replace(ckpt, best_metric=metric, best_mode=mode)


MINIMISED = ("loss", "perplexity")  # metrics where lower is better, for a best_metric given without best_mode
