"""Scores a saved checkpoint (or the pretrained model a run started from) in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from etils import epath

from jaxtune import config as config_lib
from jaxtune import sharding, storage
from jaxtune.config import Config
from jaxtune.data import lm, splits
from jaxtune.errors import UserError
from jaxtune.generation import decoder as decoder_generation
from jaxtune.generation import search
from jaxtune.models.model import Model
from jaxtune.tasks import metrics, task_for, text
from jaxtune.train import perf, reference, restore, runlog, steps
from jaxtune.weights import hf, pretrained


def evaluate_checkpoint(run_dir: str | Path | epath.Path, step: str = "latest", split: str | None = None,
                        data_file: str | None = None, limit: int | None = None) -> dict[str, Any]:
  """Restores the params (only) of one step and scores a split of the run's data or a file.

  For question answering the result also holds `predictions` (example id -> answer text), for seq2seq the
  generated targets (with BLEU and ROUGE in the metrics; generate.predict_with_generate)."""
  if (split is None) == (data_file is None):
    raise UserError("give exactly one of --split NAME or --data FILE.")
  mesh = sharding.make_mesh(config_lib.MeshConfig())  # evaluation runs on whatever devices are here
  run_dir = storage.path(run_dir)
  cfg, model, params, labels, step_num = restore.restore(run_dir, step, mesh)
  perf.use_compile_cache(cfg.train.compile_cache)  # the run's eval programs, compiled once
  sharding.check_batch_sizes(cfg.train, mesh, keys=("eval_batch_size",))
  task = task_for(cfg)
  with storage.local_dir(run_dir / "tokenizer") as local:
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(local)
    except Exception as e:  # transformers' OSError / ValueError / KeyError, the tokenizers library's bare Exception
      if not isinstance(e, (OSError, ValueError, KeyError)) and type(e) is not Exception:
        raise
      raise UserError(f"the run's tokenizer {run_dir / 'tokenizer'} does not load ({hf.one_line(e)}); finetune.py "
                      "saved it from model.path: copy that model's tokenizer files there.") from None
  name, extra = split or "file", {"file": data_file} if data_file else None
  _, data = task.load(cfg, tokenizer, [name], labels=labels, extra=extra, limit=limit)
  batch_sharding = sharding.batch_sharding(mesh)
  if cfg.task == "preference" and cfg.preference.reference == "precomputed":  # the run's starting weights
    _, reader = pretrained.open_checkpoint(cfg.model)
    reference.fill(model, task, pretrained.load_params(model, cfg.model, reader, cfg.train.seed), data[name], cfg,
                   batch_sharding)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  eval_step = steps.make_eval_step(model, task, dtype, batch_sharding)
  outputs: dict[str, Any] = {}
  result = steps.evaluate(eval_step, params, data[name], cfg, batch_sharding, task, labels, outputs)
  scores, generated = task.generate(model, params, data[name], cfg, tokenizer)
  result.update(scores)
  predictions = generated if generated is not None else task.predictions(outputs, data[name], cfg)
  if predictions is not None:
    result["predictions"] = predictions
  if cfg.generate.exact_match:
    rows = splits.load_raw(cfg.data, cfg.train.seed, [name], extra, limit)[name]
    result.update(exact_match(model, params, cfg, tokenizer, text.with_prompts(rows, cfg, name)))
  return {**result, "step": step_num, "split": split or data_file}


def exact_match(model: Model, params: Any, cfg: Config, tokenizer: Any, rows: Any) -> dict[str, Any]:
  """Share of prompts whose generation (decoded, stripped) equals the response, with a few samples."""
  prompts = [lm.encode_prompt(p, tokenizer, cfg.data.use_chat_template) for p in rows[text.PROMPT]]
  s = search.Search(cfg.generate.max_new_tokens, cfg.generate.temperature, cfg.generate.top_p)
  eos = [lm.eos_id(tokenizer)]
  outputs = []
  for i in range(0, len(prompts), cfg.train.eval_batch_size):
    chunk = prompts[i:i + cfg.train.eval_batch_size]
    outputs += decoder_generation.generate(model, params, chunk, eos, s, jax.random.key(cfg.train.seed + i),
                                           jnp.dtype(cfg.model.compute_dtype))
  answers = cfg.data.chosen_column if cfg.task == "preference" else cfg.data.response_column
  return metrics.exact_match(outputs, eos, tokenizer, rows[answers])


def write_json(result: dict[str, Any], path: epath.Path) -> None:
  """Writes `result` to `path` atomically (NaN as null), creating only the run's own eval/ directory."""
  if not storage.is_remote(path):
    path.parent.mkdir(exist_ok=True)
  storage.write_text(path, json.dumps(runlog.json_safe(result), indent=2, allow_nan=False) + "\n")
