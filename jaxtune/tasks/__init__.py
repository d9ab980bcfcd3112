"""The tasks jaxtune fine-tunes for, one module each, and the default best checkpoint metric they give.

A task (base.Task) owns what differs between them: how its splits are encoded and batched, its loss,
its eval outputs and metrics (metrics.py), the model head it trains and its best-checkpoint metric.
"""

from __future__ import annotations

import dataclasses

from jaxtune.config import CheckpointConfig, Config
from jaxtune.tasks.base import Task
from jaxtune.tasks.classification import Classification
from jaxtune.tasks.preference import Preference
from jaxtune.tasks.spans import QuestionAnswering, TokenClassification
from jaxtune.tasks.text import CausalLM, Seq2Seq

TASKS: dict[str, Task] = {"classification": Classification(), "question_answering": QuestionAnswering(),
                          "token_classification": TokenClassification(), "causal_lm": CausalLM(),
                          "seq2seq": Seq2Seq(), "preference": Preference()}


def task_for(cfg: Config) -> Task:
  """The config's task, holding what its jitted methods read of the config."""
  return TASKS[cfg.task].configured(cfg)


def checkpoint_config(cfg: Config) -> CheckpointConfig:
  """cfg.checkpoint with the task's best metric (and its direction) where the config leaves them unset."""
  ckpt = cfg.checkpoint
  if ckpt.best_metric is not None:
    return ckpt
  metric, mode = TASKS[cfg.task].best(cfg)
  return dataclasses.replace(ckpt, best_metric=metric, best_mode=ckpt.best_mode or mode)
