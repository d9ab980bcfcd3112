"""LoRA adapters out of jaxtune: merged into their kernels (for an HF export), or as a PEFT adapter directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.models.lora import is_adapter
from jaxtune.weights import hf


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
    stacked = hf.is_stacked(hf_key)
    for i, key in enumerate(hf.layer_keys(hf_key, a.shape)):
      module = key.removesuffix(".weight")
      a_i, b_i = (a[i], b[i]) if stacked else (a, b)
      tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, a_i.shape[-1]).T)
      tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(b_i.shape[0], -1).T)
      targets.append(module)
  saved_modules: set[str] = set()
  for path in sorted(params):  # whole modules: PEFT swaps each for its saved copy
    if path in frozen_paths or is_adapter(path):
      continue
    for key in hf.layer_keys(param_map[path][0], params[path].shape):
      saved_modules.add(key.rsplit(".", 1)[0])
  for path, (hf_key, layout) in param_map.items():
    stacked = hf.is_stacked(hf_key)
    for i, key in enumerate(hf.layer_keys(hf_key, params[path].shape)):
      if key.rsplit(".", 1)[0] in saved_modules:
        value = params[path][i] if stacked else params[path]
        tensors[prefix + key] = np.ascontiguousarray(hf.to_hf(value, layout))
  config = {"peft_type": "LORA", "task_type": PEFT_TASKS[task], "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout, "target_modules": targets, "modules_to_save": sorted(saved_modules),
            "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
            "base_model_name_or_path": cfg.path}
  return config, tensors


def write_peft(out_dir: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file

  (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
