"""LoRA adapters out of jaxtune: merged into their kernels (for an HF export), or as a PEFT adapter directory."""

from __future__ import annotations

import dataclasses
import json
import re
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
  fused = hf.fused_rows(param_map)
  pieces: dict[str, FusedAdapter] = {}  # fused HF module -> its adapter pieces
  for path in sorted(params):
    if not path.endswith(".lora_a"):
      continue
    base = path.removesuffix(".lora_a")
    hf_key, kind = param_map[base + ".kernel"]
    a, b = params[path], params[base + ".lora_b"]
    stacked = hf.stacked_dims(hf_key) > 0  # a Dense's adapter: stacked over the layers alone
    for i, key in enumerate(hf.layer_keys(hf_key, a.shape)):
      module = key.removesuffix(".weight")
      a_i, b_i = (a[i], b[i]) if stacked else (a, b)
      a_i, b_i = a_i.reshape(-1, a_i.shape[-1]).T, b_i.reshape(b_i.shape[0], -1).T  # (rank, in), (out, rank)
      if (span := hf.rows(kind)[1]) is not None:
        # one PEFT pattern names the module in every layer: its key with any layer number
        pattern = r"\d+".join(map(re.escape, hf_key.removesuffix(".weight").split("{i}")))
        pieces.setdefault(module, FusedAdapter(pattern, fused[hf_key], [])).parts.append((span[0], a_i, b_i))
        continue
      tensors[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a_i)
      tensors[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(b_i)
      targets.append(module)
  rank_pattern, alpha_pattern = {}, {}
  for module, piece in sorted(pieces.items()):
    a, b = piece.adapter(cfg.lora.rank)
    tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"] = a, b
    rank_pattern[piece.pattern] = len(a)  # n pieces of rank r: rank n r, and alpha n alpha keeps the scale
    alpha_pattern[piece.pattern] = cfg.lora.alpha * len(a) / cfg.lora.rank
    targets.append(module)
  saved_modules: set[str] = set()
  for path in sorted(params):  # whole modules: PEFT swaps each for its saved copy
    if path in frozen_paths or is_adapter(path):
      continue
    for key in hf.layer_keys(param_map[path][0], params[path].shape):
      saved_modules.add(key.rsplit(".", 1)[0])
  saved = [path for path, (hf_key, _) in param_map.items()  # all pieces of a fused module, so it is whole
           if any(key.rsplit(".", 1)[0] in saved_modules for key in hf.layer_keys(hf_key, params[path].shape))]
  tensors.update({prefix + key: t for key, t in hf.to_hf_tensors(param_map, params, saved).items()})
  config = {"peft_type": "LORA", "task_type": PEFT_TASKS[task], "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
            "lora_dropout": cfg.lora.dropout, "target_modules": targets, "modules_to_save": sorted(saved_modules),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
            "base_model_name_or_path": cfg.path}
  return config, tensors


@dataclasses.dataclass
class FusedAdapter:
  """Our adapters on the pieces of one fused HF module (Phi-3's q, k, v of qkv_proj), which PEFT adapts as one."""
  pattern: str  # PEFT's rank_pattern / alpha_pattern key for the module in every layer
  rows: int  # the fused tensor's
  parts: list[tuple[int, np.ndarray, np.ndarray]]  # (first row, A (rank x in), B (piece's rows x rank)) of each

  def adapter(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one adapter of rank n x rank equal to the n pieces': A stacks theirs, B holds each one's B in its
    rows and its own columns, zeros elsewhere (also the rows of a piece without an adapter)."""
    parts = sorted(self.parts, key=lambda part: part[0])
    a = np.concatenate([a_j for _, a_j, _ in parts])
    b = np.zeros((self.rows, len(a)), a.dtype)
    for j, (first, _, b_j) in enumerate(parts):
      b[first:first + len(b_j), j * rank:(j + 1) * rank] = b_j
    return np.ascontiguousarray(a), b


def write_peft(out_dir: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file

  (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
