"""Writes trained params as a Hugging Face model directory that transformers' PyTorch classes load, or as a PEFT
adapter directory; train/restore.py reads them from a run first (scripts/export_hf.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxtune import params as params_lib
from jaxtune.config import ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES as MODEL_FAMILIES
from jaxtune.models import encoder, quant
from jaxtune.models.model import Model
from jaxtune.weights import hf, peft

# Our family -> the transformers class whose state-dict keys its param_map names (encoders: per head).
DECODERS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "mixtral": "MixtralForCausalLM"}
SEQ2SEQ = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
           "bart": "BartForConditionalGeneration", "marian": "MarianMTModel"}
FAMILIES = set(DECODERS) | set(SEQ2SEQ) | set(encoder.ARCHITECTURES)


def architecture(family: str, head: str = "classification") -> str:
  """The transformers class name of a family (an encoder's with the given head)."""
  return encoder.ARCHITECTURES[family][head] if family in encoder.ARCHITECTURES else {**DECODERS, **SEQ2SEQ}[family]


def host_params(model: Model, params: Any) -> dict[str, np.ndarray]:
  """Flat path -> numpy array of a (device) param tree, checked to be exportable."""
  if not model.hf_config:
    raise UserError("the checkpoint was saved without its HF config (hf_config in meta), so it cannot be described "
                    "to transformers; re-run the fine-tuning with this jaxtune to export it.")
  if model.family not in FAMILIES:
    raise UserError(f"family {model.family!r} has no HF export; jaxtune exports {sorted(FAMILIES)}.")
  # A quantised base (model.frozen_dtype int8 / nf4) is exported as the float32 weights it stands for.
  return {p: np.asarray(a) for p, a in params_lib.flatten(jax.device_get(quant.dequantised(params))).items()}


def hf_tensors(model: Model, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF key -> tensor in torch layout; a tied LM head has no key of its own (transformers re-ties it)."""
  param_map = MODEL_FAMILIES[model.family].param_map(model.cfg)
  if set(param_map) != set(params):  # a param without an HF key would silently be lost
    raise RuntimeError(f"{model.family} param_map and params differ: {sorted(set(param_map) ^ set(params))[:3]}")
  return hf.to_hf_tensors(param_map, params)  # Phi-3's q, k, v rows concatenated back into one qkv_proj


def hf_config(model: Model, labels: list[Any] | None, dtype: np.dtype) -> dict[str, Any]:
  """The source checkpoint's config.json, updated to describe the exported class and weights."""
  config = {**model.hf_config, "architectures": [architecture(model.family, getattr(model.cfg, "head", ""))]}
  # transformers 5 loads weights in the config's dtype; a bfloat16 source would round our float32 weights.
  config.pop("torch_dtype", None)
  config["dtype"] = str(dtype)
  if model.family in encoder.ARCHITECTURES:
    names = [str(label) for label in labels or ("start", "end")]  # a span head's two outputs
    config.update(num_labels=len(names), id2label=dict(enumerate(names)),
                  label2id={label: i for i, label in enumerate(names)})
    if model.cfg.head == "classification":
      config["problem_type"] = "single_label_classification"
  elif model.family == "gpt2":
    config["tie_word_embeddings"] = True  # our GPT-2 always scores against wte, whatever the source said
  else:
    config["tie_word_embeddings"] = model.cfg.tie_word_embeddings
  _check_describes(config, model, len(labels or []))
  return config


def _check_describes(config: dict[str, Any], model: Model, num_labels: int) -> None:
  """The config, read back as the loader reads it, must give the trained architecture (dropout aside)."""
  head = {"head": model.cfg.head} if model.family in encoder.ARCHITECTURES else {}
  rebuilt = dataclasses.asdict(MODEL_FAMILIES[model.family].config.from_hf(config, num_labels, **head))
  trained = dataclasses.asdict(model.cfg)
  differ = sorted(k for k in trained if rebuilt[k] != trained[k] and "drop" not in k)
  if differ:
    raise UserError(f"the checkpoint's hf_config disagrees with its model config on {differ}; the checkpoint "
                    "metadata is inconsistent and cannot be exported.")


def export(model: Model, params: Any, labels: list[Any] | None, model_cfg: ModelConfig | None, tokenizer_dir: Path,
           out_dir: Path, peft_adapter: bool = False, card: str | None = None) -> Path:
  """Writes `params` to out_dir as config.json, model.safetensors and the tokenizer files of `tokenizer_dir`,
  with `card` (eval/card.py) as its README.md.

  LoRA adapters are merged into their kernels. With `peft_adapter`, out_dir is instead a PEFT adapter
  directory (adapter_config.json, adapter_model.safetensors) for the base model the run started from.
  """
  check_free(out_dir)
  flat = host_params(model, params)
  if peft_adapter:
    if not model.lora.on:
      raise UserError("the run was trained without LoRA adapters (model.lora.targets), so it has no PEFT adapter; "
                      "export it without --peft.")
    family = MODEL_FAMILIES[model.family]
    task = {"encoder": getattr(model.cfg, "head", ""), "decoder": "causal_lm", "seq2seq": "seq2seq"}[family.kind]
    adapter_config, tensors = peft.peft_adapter(flat, family.param_map(model.cfg), model.frozen, model_cfg, task,
                                                fan_in_fan_out=model.family == "gpt2")
    return _write(out_dir, tokenizer_dir, lambda tmp: peft.write_peft(tmp, adapter_config, tensors), card)
  tensors = hf_tensors(model, peft.merged(flat, model.lora))
  if model.frozen_dtype != "float32":  # a bfloat16 or quantised base: the merged model in bfloat16, as QLoRA's
    tensors = {k: t.astype(jnp.bfloat16) for k, t in tensors.items()}
  (dtype,) = {t.dtype for t in tensors.values()}  # one dtype: float32, or bfloat16 for a low-precision base
  config = hf_config(model, labels, dtype)
  generation = _generation_config(model_cfg)

  def write(tmp: Path) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation is not None:
      (tmp / "generation_config.json").write_text(generation)
    save_file(tensors, tmp / hf.SAFETENSORS, metadata={"format": "pt"})  # transformers wants format=pt

  return _write(out_dir, tokenizer_dir, write, card)


def _generation_config(model_cfg: ModelConfig | None) -> str | None:
  """The source checkpoint's generation_config.json (its forced and banned tokens, beam settings), when the run
  started from a local directory that has one."""
  path = Path(model_cfg.path).expanduser() / "generation_config.json" if model_cfg else None
  return path.read_text() if path is not None and path.is_file() else None


def _write(out_dir: Path, tokenizer_dir: Path, write: Any, card: str | None = None) -> Path:
  """The tokenizer files, what `write(dir)` puts there and the model card, in out_dir as a whole or not at all."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # Built beside out_dir and renamed into place, so out_dir is either absent or complete.
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    if tokenizer_dir.is_dir():  # first, so a stray config.json in it cannot win
      for f in tokenizer_dir.iterdir():
        if f.is_file():
          shutil.copy(f, tmp / f.name)
    write(tmp)
    if card is not None:
      (tmp / "README.md").write_text(card)
    check_free(out_dir)
    try:
      tmp.replace(out_dir)  # POSIX rename also replaces an empty directory
    except OSError:
      raise UserError(f"output dir {out_dir} was filled while exporting; choose an empty or new --output.") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def check_free(out_dir: Path) -> None:
  """An export may go to a new or empty directory only."""
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise UserError(f"output dir {out_dir} already exists and is not empty; choose a new --output (nothing "
                    "was written).")
