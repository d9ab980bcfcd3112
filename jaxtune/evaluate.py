"""Scores a saved checkpoint (or the pretrained model a run started from) in a fresh process."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import transformers

from jaxtune import config as config_lib
from jaxtune import generate, generate_encdec, metrics, perf, pretrained, rundir, sharding, steps, tasks, train
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import CheckpointConfig, Config, ModelConfig
from jaxtune.data import lm, seq2seq, splits
from jaxtune.errors import UserError
from jaxtune.tasks import TASKS


def load_run_config(run_dir: Path) -> Config:
  path = run_dir / "config.yaml"
  if not path.is_file():
    raise UserError(f"{run_dir} has no config.yaml; pass the --run-dir of a finetune.py run to --checkpoint.")
  return config_lib.load(path)


def restore_step(run_dir: Path, step: str,
                 mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], pretrained.Model, Any, int]:
  """(meta, model, params, step number) of a saved step, params only, placed in their shardings."""
  # config.yaml only says which metric 'best' means; a checkpoints/ dir copied alone uses the defaults.
  has_config = (run_dir / "config.yaml").is_file()
  ckpts = Checkpoints(run_dir, load_run_config(run_dir).checkpoint if has_config else CheckpointConfig(),
                      read_only=True)
  models: dict[int, pretrained.Model] = {}

  def targets(meta: dict[str, Any]) -> dict[str, Any]:
    family = pretrained.FAMILIES[meta["family"]]
    model = models[id(meta)] = pretrained.describe(meta["family"], family.config(**meta["model"]), mesh,
                                                   hf_config=meta.get("hf_config"), model_cfg=model_config(meta))
    return {"params": steps.trainable(sharding.placed(sharding.unflatten(model.abstract), model.shardings),
                                      model.frozen)}

  if step == "latest":  # the newest checkpoint that reads back; damaged newer ones are named and skipped
    step_num, meta, got = ckpts.restore_latest(targets)
  else:
    step_num = ckpts.resolve(step)
    meta = ckpts.meta(step_num)
    got = ckpts.restore(step_num, **targets(meta))
  ckpts.close()
  model, params = models[id(meta)], got["params"]
  if model.frozen:  # checkpoints hold the trainable params; the frozen ones are the base model's
    model_cfg = model_config(meta)
    _, reader = pretrained.open_checkpoint(model_cfg)
    base = pretrained.load_params(model, model_cfg, reader, 0, model.frozen)
    params = sharding.unflatten({**sharding.flatten(params), **base})
  return meta, model, params, step_num


def model_config(meta: dict[str, Any]) -> ModelConfig | None:
  """The model section of the config a checkpoint was trained with (None in metadata without it)."""
  raw = (meta.get("config") or {}).get("model")
  return config_lib.from_dict(ModelConfig, raw, "model.") if raw else None


def restore(run_dir: Path, step: str, mesh: jax.sharding.Mesh) -> tuple[Config, pretrained.Model, Any, Any, Any]:
  """(config, model, params, labels, step number) of a saved step; step 'base' = the pretrained weights."""
  if step == "base":  # what fine-tuning started from: the new params (a head) are freshly initialised
    run_cfg = load_run_config(run_dir)
    ckpts = Checkpoints(run_dir, run_cfg.checkpoint, read_only=True)
    labels = ckpts.meta(ckpts.resolve("latest"))["labels"] if ckpts.steps() else None
    model, params = pretrained.from_pretrained(run_cfg.model, len(labels or ()), mesh, run_cfg.train.seed,
                                               run_cfg.task)
    return run_cfg, model, params, labels, 0
  meta, model, params, step_num = restore_step(run_dir, step, mesh)
  cfg = config_lib.from_dict(Config, meta["config"])  # the config this checkpoint was trained with
  return cfg, model, params, meta["labels"], step_num


def evaluate_checkpoint(run_dir: Path, step: str = "latest", split: str | None = None,
                        data_file: str | None = None, limit: int | None = None) -> dict[str, Any]:
  """Restores the params (only) of one step and scores a split of the run's data or a file.

  For question answering the result also holds `predictions` (example id -> answer text), for seq2seq the
  generated targets (with BLEU and ROUGE in the metrics; generate.predict_with_generate)."""
  if (split is None) == (data_file is None):
    raise UserError("give exactly one of --split NAME or --data FILE.")
  mesh = sharding.make_mesh(config_lib.MeshConfig())  # evaluation runs on whatever devices are here
  cfg, model, params, labels, step_num = restore(run_dir, step, mesh)
  perf.use_compile_cache(cfg.train.compile_cache)  # the run's eval programs, compiled once
  train.check_devices(cfg, mesh, keys=("eval_batch_size",))
  task = TASKS[cfg.task]
  tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")
  name, extra = split or "file", {"file": data_file} if data_file else None
  _, data = task.load(cfg, tokenizer, [name], labels=labels, extra=extra, limit=limit)
  batch_sharding = sharding.batch_sharding(mesh)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  eval_step = steps.make_eval_step(model, task, dtype, model.shardings, batch_sharding)
  outputs: dict[str, Any] = {}
  result = steps.evaluate(eval_step, params, data[name], cfg, batch_sharding, task, labels, outputs)
  if hasattr(task, "predictions"):
    result["predictions"] = task.predictions(outputs, data[name], cfg)
  if cfg.task == "seq2seq" and cfg.generate.predict_with_generate:
    scores, result["predictions"] = translate(model, params, cfg, tokenizer, data[name])
    result.update(scores)
  if cfg.generate.exact_match:
    rows = splits.load_raw(cfg.data, cfg.train.seed, [name], extra, limit)[name]
    result.update(exact_match(model, params, cfg, tokenizer, tasks.with_prompts(rows, cfg, name)))
  return {**result, "step": step_num, "split": split or data_file}


def exact_match(model: pretrained.Model, params: Any, cfg: Config, tokenizer: Any, rows: Any) -> dict[str, Any]:
  """Share of prompts whose generation (decoded, stripped) equals the response, with a few samples."""
  prompts = [lm.encode_prompt(p, tokenizer, cfg.data.use_chat_template) for p in rows[tasks.PROMPT]]
  s = generate.Sampling(cfg.generate.max_new_tokens, cfg.generate.temperature, cfg.generate.top_p)
  eos = [lm.eos_id(tokenizer)]
  outputs = []
  for i in range(0, len(prompts), cfg.train.eval_batch_size):
    chunk = prompts[i:i + cfg.train.eval_batch_size]
    outputs += generate.generate(model, params, chunk, eos, s, jax.random.key(cfg.train.seed + i),
                                 jnp.dtype(cfg.model.compute_dtype))
  return score_generations(outputs, eos, tokenizer, rows[cfg.data.response_column])


def translate(model: pretrained.Model, params: Any, cfg: Config, tokenizer: Any,
              pairs: seq2seq.Pairs) -> tuple[dict[str, Any], list[dict[str, str]]]:
  """(BLEU, ROUGE-1/2/L and the mean generated length; source/reference/prediction rows) of generating a target for
  every source of a split, eval_batch_size sources at a time."""
  rules = generate_encdec.rules_for(model, cfg.model)
  s = generate_encdec.Search.from_config(cfg.generate)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  outputs = []
  for i in range(0, len(pairs), cfg.train.eval_batch_size):
    chunk = pairs.input_ids[i:i + cfg.train.eval_batch_size]
    outputs += generate_encdec.generate(model, params, chunk, rules, s, jax.random.key(cfg.train.seed + i), dtype)
  texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
  scores = {"bleu": metrics.bleu(texts, pairs.references), **metrics.rouge(texts, pairs.references),
            "generated_length": sum(len(out) for out in outputs) / max(len(outputs), 1)}
  rows = [{"source": src, "reference": ref, "prediction": text}
          for src, ref, text in zip(pairs.sources, pairs.references, texts, strict=True)]
  return scores, rows


def score_generations(outputs: Sequence[Sequence[int]], eos: Sequence[int], tokenizer: Any,
                      responses: Sequence[str]) -> dict[str, Any]:
  """exact_match: the share of generations (EOS dropped, decoded, stripped) equal to their stripped response."""
  texts = [tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True).strip() for out in outputs]
  hits = [t == r.strip() for t, r in zip(texts, responses, strict=True)]
  return {"exact_match": sum(hits) / len(hits), "samples": texts[:5]}


def write_json(result: dict[str, Any], path: Path) -> None:
  """Writes `result` to `path` atomically (NaN as null), creating only the run's own eval/ directory."""
  path.parent.mkdir(exist_ok=True)
  rundir.write_text(path, json.dumps(metrics.json_safe(result), indent=2, allow_nan=False) + "\n")
