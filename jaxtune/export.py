"""Writes a saved checkpoint as a Hugging Face model directory that transformers' PyTorch classes load."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxtune import evaluate, lora, pretrained, sharding, weights
from jaxtune.config import MeshConfig
from jaxtune.errors import UserError
from jaxtune.models import encoder

# Our family -> the transformers class whose state-dict keys its param_map names (encoders: per head).
DECODERS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}
SEQ2SEQ = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
           "bart": "BartForConditionalGeneration", "marian": "MarianMTModel"}
FAMILIES = set(DECODERS) | set(SEQ2SEQ) | set(encoder.ARCHITECTURES)


def architecture(family: str, head: str = "classification") -> str:
  """The transformers class name of a family (an encoder's with the given head)."""
  return encoder.ARCHITECTURES[family][head] if family in encoder.ARCHITECTURES else {**DECODERS, **SEQ2SEQ}[family]


def load_checkpoint(run_dir: Path, step: str) -> tuple[dict[str, Any], pretrained.Model, dict[str, np.ndarray]]:
  """(meta, model, flat params on the host) of one saved step; the optimiser state is not read."""
  if not (run_dir / "checkpoints").is_dir():
    raise UserError(f"{run_dir} has no checkpoints/ directory; pass --checkpoint the run directory of a "
                    "finetune.py run.")
  meta, model, params, step_num = evaluate.restore_step(run_dir, step, sharding.make_mesh(MeshConfig()))
  if not meta.get("hf_config"):
    raise UserError(f"the checkpoint at step {step_num} was saved without its HF config (hf_config in meta), "
                    "so it cannot be described to transformers; re-run the fine-tuning with this jaxtune to export it.")
  if meta["family"] not in FAMILIES:
    raise UserError(f"family {meta['family']!r} has no HF export; jaxtune exports {sorted(FAMILIES)}.")
  return meta, model, {p: np.asarray(a) for p, a in sharding.flatten(jax.device_get(params)).items()}


def hf_tensors(model: pretrained.Model, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF key -> tensor in torch layout; a tied LM head has no key of its own (transformers re-ties it)."""
  param_map = pretrained.FAMILIES[model.family].param_map(model.cfg)
  if set(param_map) != set(params):  # a param without an HF key would silently be lost
    raise RuntimeError(f"{model.family} param_map and params differ: {sorted(set(param_map) ^ set(params))[:3]}")
  out = {}
  for path, (hf_key, kind) in param_map.items():
    keys = weights.layer_keys(hf_key, params[path].shape)
    layers = params[path] if weights.is_stacked(hf_key) else [params[path]]  # a stacked param is N x ...
    for key, array in zip(keys, layers, strict=True):
      out[key] = np.ascontiguousarray(weights.to_hf(array, kind))  # safetensors wants C order
  return out


def hf_config(meta: dict[str, Any], model: pretrained.Model, dtype: np.dtype) -> dict[str, Any]:
  """The source checkpoint's config.json, updated to describe the exported class and weights."""
  config = {**meta["hf_config"], "architectures": [architecture(model.family, getattr(model.cfg, "head", ""))]}
  # transformers 5 loads weights in the config's dtype; a bfloat16 source would round our float32 weights.
  config.pop("torch_dtype", None)
  config["dtype"] = str(dtype)
  if model.family in encoder.ARCHITECTURES:
    labels = [str(label) for label in meta["labels"] or ("start", "end")]  # a span head's two outputs
    config.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={label: i for i, label in enumerate(labels)})
    if model.cfg.head == "classification":
      config["problem_type"] = "single_label_classification"
  elif model.family == "gpt2":
    config["tie_word_embeddings"] = True  # our GPT-2 always scores against wte, whatever the source said
  else:
    config["tie_word_embeddings"] = model.cfg.tie_word_embeddings
  _check_describes(config, model, len(meta.get("labels") or []))
  return config


def _check_describes(config: dict[str, Any], model: pretrained.Model, num_labels: int) -> None:
  """The config, read back as the loader reads it, must give the trained architecture (dropout aside)."""
  head = {"head": model.cfg.head} if model.family in encoder.ARCHITECTURES else {}
  rebuilt = dataclasses.asdict(pretrained.FAMILIES[model.family].config.from_hf(config, num_labels, **head))
  trained = dataclasses.asdict(model.cfg)
  differ = sorted(k for k in trained if rebuilt[k] != trained[k] and "drop" not in k)
  if differ:
    raise UserError(f"the checkpoint's hf_config disagrees with its model config on {differ}; the checkpoint "
                    "metadata is inconsistent and cannot be exported.")


def export(run_dir: Path, step: str, out_dir: Path, peft: bool = False) -> Path:
  """Writes step `step` of run_dir to out_dir as config.json, model.safetensors and the run's tokenizer.

  LoRA adapters are merged into their kernels. With `peft`, out_dir is instead a PEFT adapter directory
  (adapter_config.json, adapter_model.safetensors) for the base model the run started from.
  """
  run_dir, out_dir = Path(run_dir), Path(out_dir)
  _check_free(out_dir)
  meta, model, params = load_checkpoint(run_dir, step)
  if peft:
    if not model.lora.on:
      raise UserError(f"{run_dir} was trained without LoRA adapters (model.lora.targets), so it has no PEFT "
                      "adapter; export it without --peft.")
    model_cfg = evaluate.model_config(meta)
    family = pretrained.FAMILIES[model.family]
    task = {"encoder": getattr(model.cfg, "head", ""), "decoder": "causal_lm", "seq2seq": "seq2seq"}[family.kind]
    adapter_config, tensors = lora.peft_adapter(params, family.param_map(model.cfg), model.frozen, model_cfg, task,
                                                fan_in_fan_out=model.family == "gpt2")
    return _write(out_dir, run_dir, lambda tmp: lora.write_peft(tmp, adapter_config, tensors))
  tensors = hf_tensors(model, lora.merged(params, model.lora))
  (dtype,) = {t.dtype for t in tensors.values()}  # params are kept in one dtype (float32)
  config = hf_config(meta, model, dtype)

  generation = _generation_config(meta)

  def write(tmp: Path) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if generation is not None:
      (tmp / "generation_config.json").write_text(generation)
    save_file(tensors, tmp / weights.SAFETENSORS, metadata={"format": "pt"})  # transformers wants format=pt

  return _write(out_dir, run_dir, write)


def _generation_config(meta: dict[str, Any]) -> str | None:
  """The source checkpoint's generation_config.json (its forced and banned tokens, beam settings), when the run
  started from a local directory that has one."""
  model_cfg = evaluate.model_config(meta)
  path = Path(model_cfg.path).expanduser() / "generation_config.json" if model_cfg else None
  return path.read_text() if path is not None and path.is_file() else None


def _write(out_dir: Path, run_dir: Path, write: Any) -> Path:
  """The run's tokenizer and what `write(dir)` puts there, in out_dir as a whole or not at all."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # Built beside out_dir and renamed into place, so out_dir is either absent or complete.
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    if (run_dir / "tokenizer").is_dir():  # first, so a stray config.json in it cannot win
      for f in (run_dir / "tokenizer").iterdir():
        if f.is_file():
          shutil.copy(f, tmp / f.name)
    write(tmp)
    _check_free(out_dir)
    try:
      tmp.replace(out_dir)  # POSIX rename also replaces an empty directory
    except OSError:
      raise UserError(f"output dir {out_dir} was filled while exporting; choose an empty or new --output.") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _check_free(out_dir: Path) -> None:
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise UserError(f"output dir {out_dir} already exists and is not empty; choose a new --output (nothing "
                    "was written).")
