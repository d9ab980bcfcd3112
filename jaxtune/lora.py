"""LoRA adapters and frozen params: which params train, attaching adapters, merging them, PEFT export.

An adapter on a Dense with kernel W (*in, *out) adds lora_a A (*in, rank) and lora_b B (rank, *out):
y = x W + b + (alpha / rank) dropout(x) A B. A starts as PEFT's (uniform in +-1/sqrt(fan_in)), B at zero, so
training starts from the pretrained function. In a layer stack both carry the leading `layers` axis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import weights
from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import layers

ADAPTER = r".*\.lora_[ab]"  # the param paths of adapters
is_adapter = weights.matcher([ADAPTER])


def attach(module: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
  """Adds an adapter to every Dense whose kernel path fully matches one of cfg.targets (in place)."""
  if not cfg.on:
    return
  denses = {_path(path) + ".kernel": node for path, node in nnx.iter_graph(module) if isinstance(node, layers.Dense)}
  params = [_path(path) for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Param)]
  for pattern in cfg.targets:
    hits = [p for p in params if weights.matcher([pattern])(p)]
    if not hits:
      raise UserError(f"model.lora.targets entry {pattern!r} matches no param; the Dense kernels are "
                      f"{_examples(denses)}.")
    if bad := [p for p in hits if p not in denses]:
      raise UserError(f"model.lora.targets entry {pattern!r} matches {bad[0]}, which is not a Dense kernel; LoRA "
                      f"adapts Dense kernels only ({_examples(denses)}).")
  match = weights.matcher(cfg.targets)
  for i, (path, dense) in enumerate(sorted((p, d) for p, d in denses.items() if match(p))):
    kernel = dense.kernel
    axes = kernel.get_metadata()["axes"]
    lead = 1 if axes[0] == "layers" else 0  # a stacked layer's kernel is N x *in x *out
    shape = kernel.get_value().shape
    fan_in = math.prod(shape[lead:lead + dense.n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a_shape = (*shape[:lead + dense.n_in], cfg.rank)
    dense.lora_a = nnx.Param(jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound),
                             axes=(*axes[:lead + dense.n_in], "lora_rank"))
    dense.lora_b = nnx.Param(jnp.zeros((*shape[:lead], cfg.rank, *shape[lead + dense.n_in:]), jnp.float32),
                             axes=(*axes[:lead], "lora_rank", *axes[lead + dense.n_in:]))
    dense.lora_scale, dense.lora_dropout, dense.lora_id = cfg.alpha / cfg.rank, cfg.dropout, i


def frozen(paths: Iterable[str], cfg: ModelConfig) -> frozenset[str]:
  """The params that do not train: model.freeze matches, and with LoRA every loaded param but
  model.new_params and model.lora.train. A regex that matches nothing is an error (a typo would
  otherwise train everything)."""
  paths = list(paths)
  for key, patterns in (("model.freeze", cfg.freeze), ("model.lora.train", cfg.lora.train)):
    for pattern in patterns:
      if not any(weights.matcher([pattern])(p) for p in paths):
        raise UserError(f"config key {key} entry {pattern!r} matches no param; params look like "
                        f"{_examples(paths)}.")
  freeze = weights.matcher(cfg.freeze)
  keep = weights.matcher([ADAPTER, *cfg.new_params, *cfg.lora.train]) if cfg.lora.on else (lambda _: True)
  out = frozenset(p for p in paths if freeze(p) or not keep(p))
  if len(out) == len(paths):
    raise UserError("every param is frozen (model.freeze / model.lora), so nothing would train; freeze fewer "
                    "params or set model.lora.targets.")
  return out


def split(params: Mapping[str, Any], frozen_paths: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable, frozen) halves of a flat param dict."""
  return ({p: v for p, v in params.items() if p not in frozen_paths},
          {p: v for p, v in params.items() if p in frozen_paths})


def merged(params: Mapping[str, np.ndarray], cfg: LoraConfig) -> dict[str, np.ndarray]:
  """Flat params with each adapter folded into its kernel (W + alpha/rank A B) and the adapters dropped."""
  out = {p: v for p, v in params.items() if not is_adapter(p)}
  for path in params:
    if path.endswith(".lora_a"):
      base = path.removesuffix(".lora_a")
      kernel, a, b = params[base + ".kernel"], params[path], params[base + ".lora_b"]
      out[base + ".kernel"] = (kernel + _delta(a, b, kernel.ndim) * (cfg.alpha / cfg.rank)).astype(kernel.dtype)
  return out


def _delta(a: np.ndarray, b: np.ndarray, kernel_ndim: int) -> np.ndarray:
  """A B with A (*lead, *in, r) and B (*lead, r, *out), batched over a leading layers axis if any."""
  lead = a.ndim + b.ndim - 2 - kernel_ndim  # 1 for stacked adapters, else 0
  a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])
  b2 = b.reshape(*b.shape[:lead + 1], -1)
  return np.matmul(a2.astype(np.float64), b2.astype(np.float64)).reshape(
      *a.shape[:-1], *b.shape[lead + 1:])


PEFT_TASKS = {"classification": "SEQ_CLS", "question_answering": "QUESTION_ANS",
              "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM",
              "seq2seq": "SEQ_2_SEQ_LM"}  # our task -> PEFT's task_type


def peft_adapter(params: Mapping[str, np.ndarray], param_map: Mapping[str, tuple[str, str]],
                 frozen_paths: frozenset[str], cfg: ModelConfig, task: str, fan_in_fan_out: bool
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json, adapter_model.safetensors tensors) that peft loads onto the transformers model.

  Adapters become `<module>.lora_A.weight` (rank x in) and `lora_B.weight` (out x rank); trainable
  params outside the adapters (a fresh head, model.lora.train) are saved whole under modules_to_save.
  """
  prefix = "base_model.model."
  tensors: dict[str, np.ndarray] = {}
  targets: list[str] = []
  for path in sorted(params):
    if not path.endswith(".lora_a"):
      continue
    base = path.removesuffix(".lora_a")
    hf_key = param_map[base + ".kernel"][0]
    a, b = params[path], params[base + ".lora_b"]
    stacked = weights.is_stacked(hf_key)
    for i, key in enumerate(weights.layer_keys(hf_key, a.shape)):
      module = key.removesuffix(".weight")
      a_i, b_i = (a[i], b[i]) if stacked else (a, b)
      tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, a_i.shape[-1]).T)
      tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(b_i.shape[0], -1).T)
      targets.append(module)
  saved_modules: set[str] = set()
  for path in sorted(params):  # whole modules: PEFT swaps each for its saved copy
    if path in frozen_paths or is_adapter(path):
      continue
    for key in weights.layer_keys(param_map[path][0], params[path].shape):
      saved_modules.add(key.rsplit(".", 1)[0])
  for path, (hf_key, layout) in param_map.items():
    stacked = weights.is_stacked(hf_key)
    for i, key in enumerate(weights.layer_keys(hf_key, params[path].shape)):
      if key.rsplit(".", 1)[0] in saved_modules:
        value = params[path][i] if stacked else params[path]
        tensors[prefix + key] = np.ascontiguousarray(weights.to_hf(value, layout))
  config = {"peft_type": "LORA", "task_type": PEFT_TASKS[task], "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout, "target_modules": targets, "modules_to_save": sorted(saved_modules),
            "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
            "base_model_name_or_path": cfg.path}
  return config, tensors


def write_peft(out_dir: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file

  (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})


def _path(path: tuple[Any, ...]) -> str:
  return ".".join(str(k) for k in path)


def _examples(paths: Iterable[str]) -> str:
  paths = sorted(paths)
  return ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
