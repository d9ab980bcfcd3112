"""The model card an export writes as README.md: the form the Hugging Face hub renders (YAML metadata, then
Markdown) with the base model, task, data, the run's metrics (summary.json and the exported step's eval), the
training recipe and the whole config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from jaxtune import config as config_lib
from jaxtune.config import Config

PIPELINE = {"classification": "text-classification", "question_answering": "question-answering",
            "token_classification": "token-classification", "causal_lm": "text-generation",
            "preference": "text-generation", "seq2seq": "text2text-generation"}


def hub_id(path: str) -> str | None:
  """`path` when it names a hub repository (as model.path resolves it: not a local path, URL or pkg:// path)."""
  if "://" in path or path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists():
    return None
  return path


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
  rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("step",)]
  return ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in rows)]


def model_card(cfg: Config, step: int, step_metrics: dict[str, Any] | None, summary: dict[str, Any] | None,
               run_name: str, peft: bool = False) -> str:
  """README.md for the export of `step` of a run trained with `cfg`."""
  base = hub_id(cfg.model.path)
  meta: dict[str, Any] = {"library_name": "peft" if peft else "transformers",
                          "pipeline_tag": PIPELINE[cfg.task], "tags": ["jaxtune", cfg.task]}
  if base:
    meta["base_model"] = base
  d, o, t = cfg.data, cfg.optim, cfg.train
  data = [f"- {name}: `{spec}`" for name, spec in (("train", d.train), ("validation", d.validation),
                                                   ("test", d.test)) if spec]
  if d.validation_holdout and not d.validation:
    data.append(f"- validation: {d.validation_holdout} rows held out of train (seed {t.seed})")
  lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {run_name}", "",
           f"Fine-tuned with [jaxtune](https://pypi.org/project/jaxtune/) from `{cfg.model.path}` for {cfg.task}"
           + (" (a PEFT LoRA adapter for that base model)." if peft else "."), "",
           f"Exported step {step}" + (f" of {summary['total_steps']}" if summary else "") + ".", "",
           "## Data", "", *data, ""]
  if step_metrics:
    lines += [f"## Validation at step {step}", "", *_metrics_table(step_metrics), ""]
  if summary:
    for title, key in (("Best validation", "best_eval"), ("Last validation", "last_eval")):
      if summary.get(key):
        lines += [f"## {title} (step {summary[key].get('step')}, from summary.json)", "",
                  *_metrics_table(summary[key]), ""]
  else:
    lines += ["The run has no summary.json: it did not finish (stopped or still running).", ""]
  lines += ["## Training", "",
            f"AdamW, lr {o.lr:g} ({o.schedule} after {o.warmup_steps} warmup steps), weight decay {o.weight_decay:g}, "
            f"clip norm {o.clip_norm:g}; batch {t.batch_size} ({t.grad_accum} microbatch(es)), "
            + (f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs") + f", seed {t.seed}; "
            f"max length {d.max_len}; {cfg.model.compute_dtype} compute.", ""]
  if summary:
    lines += [f"Versions: {json.dumps(summary.get('versions', {}))}; devices: {json.dumps(summary.get('devices'))}.",
              ""]
  lines += ["## Config", "", "```yaml", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False).strip(), "```", ""]
  return "\n".join(lines)
