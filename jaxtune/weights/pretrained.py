"""A model from an HF checkpoint (directory, hub id or GGUF file), loaded straight into its shardings.

`from_config` describes the model a config.json gives (models/model.py: abstract init, shardings);
`load_params` then reads every param from the checkpoint onto its devices and initialises the new
ones (a task head, LoRA adapters). The tokenizer comes from the same place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import transformers
from jax.sharding import Mesh

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES, ModelFamily, lora, quant
from jaxtune.models.model import Model, describe, init_params
from jaxtune.params import Params
from jaxtune.weights import gguf, hf


def family_of(hf_config: dict[str, Any]) -> tuple[str, ModelFamily]:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise UserError(f"model_type {model_type!r} in config.json is not supported; jaxtune knows "
                    f"{sorted(FAMILIES)}.")
  return model_type, FAMILIES[model_type]


def open_checkpoint(model_cfg: ModelConfig) -> tuple[dict[str, Any], Any]:
  """(HF config dict, tensor reader) of an HF directory, hub id or llama.cpp .gguf file."""
  local = hf.resolve_path(model_cfg.path)
  if local.suffix == ".gguf":
    reader = gguf.GGUFReader(local)
    return reader.hf_config(), reader
  model_dir = hf.resolve_model_dir(model_cfg.path)
  return hf.read_hf_config(model_dir), hf.SafetensorsReader(model_dir)


def load_tokenizer(model_cfg: ModelConfig) -> Any:
  """model.tokenizer if set, else the tokenizer stored with the checkpoint (HF dir or GGUF metadata)."""
  key = "model.tokenizer" if model_cfg.tokenizer else "model.path"
  source = model_cfg.tokenizer or model_cfg.path
  local = hf.resolve_path(source, key)
  if local.suffix == ".gguf":
    return gguf.load_tokenizer(local)
  fix = ("re-download the tokenizer files or re-save them (tokenizer.save_pretrained(dir)), or set model.tokenizer "
         "to an HF tokenizer directory or hub id")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(local)
  except Exception as e:
    # transformers raises OSError, ValueError, KeyError for missing or malformed files; the tokenizers library
    # raises a bare Exception for a tokenizer.json or vocabulary it cannot parse. Anything else is a bug.
    if not isinstance(e, (OSError, ValueError, KeyError)) and type(e) is not Exception:
      raise
    raise UserError(f"no tokenizer could be loaded from {key} {source} ({hf.one_line(e)}); {fix}.") from None
  # transformers builds a tokenizer of special tokens only when its vocabulary files are absent; every text would
  # then be [UNK]. A directory must hold the files its tokenizer class reads.
  files = sorted({*tokenizer.vocab_files_names.values(), "tokenizer.json"})
  if local.is_dir() and not any((local / name).is_file() for name in files):
    raise UserError(f"no tokenizer could be loaded from {key} {source}: {local} has none of the files "
                    f"{', '.join(files)} that a {type(tokenizer).__name__} reads; {fix}.")
  return tokenizer


def check_kind(hf_config: dict[str, Any], model_cfg: ModelConfig, head: str | None) -> tuple[str, ModelFamily]:
  """(family name, family) of an HF config; a family that cannot carry `head` (a task's name) is a UserError."""
  family_name, family = family_of(hf_config)
  kind = {"causal_lm": "decoder", "preference": "decoder", "seq2seq": "seq2seq"}.get(head or "", "encoder")
  if head is not None and family.kind != kind:
    raise UserError(f"model.path {model_cfg.path} is a {family_name} {family.kind}, but task {head} needs "
                    f"{'an' if kind == 'encoder' else 'a'} {kind} model; change task or model.path.")
  return family_name, family


def from_config(hf_config: dict[str, Any], model_cfg: ModelConfig, num_labels: int, mesh: Mesh, seed: int = 0,
                head: str | None = None, rules: sharding.Rules = sharding.RULES) -> Model:
  """The model an HF config (from `open_checkpoint`) describes, shardings included; no weight is read.

  `head` is the task (classification, question_answering, token_classification, causal_lm), which
  decides the encoders' head; a model of the wrong kind for it is a UserError. None: the family's default.
  """
  family_name, family = check_kind(hf_config, model_cfg, head)
  task_head = {} if head is None else {"head": head}
  try:
    cfg = family.config.from_hf(hf_config, num_labels, model_cfg.dropout, **task_head)
  except (TypeError, KeyError) as e:  # a config.json without the fields its model_type has
    raise UserError(f"{model_cfg.path}: config.json lacks fields ({e}) that a {family_name} model needs; use the "
                    "checkpoint's own config.json.") from None
  cfg = dataclasses.replace(cfg, scan_layers=model_cfg.scan_layers)
  return describe(family_name, cfg, mesh, seed, hf_config, rules, model_cfg)


def load_params(model: Model, model_cfg: ModelConfig, reader: Any, seed: int,
                only: frozenset[str] | None = None) -> Params:
  """Params read from `reader` (see `open_checkpoint`) straight into their shardings; new_params and LoRA
  adapters initialised. With `only` (param paths), just those params, all read from the checkpoint."""
  family = FAMILIES[model.family]
  # HF keys name params by flat path: the import works on flat trees and hands back a nested one.
  loaded = hf.load_params(
      params_lib.flatten(model.abstract), params_lib.flatten(model.shardings), family.param_map(model.cfg),
      reader, new_params=() if only is not None else (*model_cfg.new_params, lora.ADAPTER),
      unused_keys=model_cfg.unused_keys, buffer_keys=family.ignored_keys(model.cfg), base_prefix=family.base_prefix,
      only=only)
  if only is not None:
    return params_lib.unflatten(frozen_precision(model, loaded))
  fresh = init_params(model, seed, only=set(model.axes) - set(loaded))
  return params_lib.merge(params_lib.unflatten(frozen_precision(model, loaded)), fresh)


def frozen_precision(model: Model, loaded: dict[str, Any]) -> dict[str, Any]:
  """Loaded params (flat path -> array) with the frozen ones as model.frozen_dtype holds them: cast to bfloat16,
  or (model.quantised kernels) quantised to int8 / NF4, one param at a time so that only one float copy of a
  kernel is alive beside the quantised ones. Trained params stay float32 (the master weights)."""
  if model.frozen_dtype == "float32":
    return loaded
  held = params_lib.flatten(model.held[1], is_leaf=quant.is_quantised)
  out = {}
  for path in list(loaded):
    array = loaded.pop(path)
    if path in model.quantised:  # quantised where its shards are (quant.placement): no device holds the whole kernel
      out[path] = quant.quantise(array, model.frozen_dtype, 1, model.quantised[path], held[path])
    elif path in model.frozen:
      out[path] = array.astype(jnp.bfloat16)
    else:
      out[path] = array
    del array
  return out


def from_pretrained(model_cfg: ModelConfig, num_labels: int, mesh: Mesh, seed: int, head: str | None = None,
                    rules: sharding.Rules = sharding.RULES) -> tuple[Model, Params]:
  """(model, params): params from the checkpoint, new ones (model.new_params) initialised."""
  hf_config, reader = open_checkpoint(model_cfg)  # opened once: parsing a GGUF file takes seconds
  model = from_config(hf_config, model_cfg, num_labels, mesh, seed, head, rules)
  return model, load_params(model, model_cfg, reader, seed)
