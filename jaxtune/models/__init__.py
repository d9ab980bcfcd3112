"""Registry of model families: HF `model_type` -> our config, module and checkpoint layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxtune.models import bert


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  config: type  # frozen dataclass with from_hf(hf config dict, num_labels, dropout)
  module: type  # nnx.Module class built as module(cfg, rngs=...)
  param_map: Callable[[Any], dict[str, tuple[str, str]]]  # our path -> (HF key, layout kind)
  buffer_keys: tuple[str, ...]  # checkpoint keys that are buffers, never params
  base_prefix: str  # prefix HF task models add to the base model's keys


FAMILIES: dict[str, ModelFamily] = {
    "bert": ModelFamily(bert.BertConfig, bert.BertClassifier, bert.hf_param_map,
                        bert.HF_BUFFER_KEYS, bert.HF_BASE_PREFIX),
}
