"""jaxtune from Python: `finetune`, `evaluate` and `load` (re-exported as jaxtune.finetune, ...).

    import jaxtune

    result = jaxtune.finetune("minilm_reviews", "runs/api", train={"max_steps": 20})
    print(result.metrics, result.summary["status"])
    print(jaxtune.evaluate("runs/api", step="best", split="test")["accuracy"])
    model, tokenizer = jaxtune.load("runs/api")
    print(model.predict(["Tasty and fresh.", "Stale, never again."]))

The same work as `jaxtune finetune` / `jaxtune evaluate` (a UserError, not an exit code, for a bad input).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
import yaml

from jaxtune import config as config_lib
from jaxtune import distributed, sharding, storage
from jaxtune.config import Config, ModelConfig
from jaxtune.data import lm
from jaxtune.errors import UserError
from jaxtune.eval import evaluate as evaluate_lib
from jaxtune.generation import decoder, search
from jaxtune.generation import seq2seq as seq2seq_generation
from jaxtune.models.model import Model
from jaxtune.train import loop, restore
from jaxtune.weights import pretrained


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `finetune` leaves: the run directory, its last validation metrics and its summary.json."""
  run_dir: str
  metrics: dict[str, Any]
  summary: dict[str, Any]
  config: Config


def make_config(config: str | Path | Config | Mapping[str, Any], **overrides: Any) -> Config:
  """A Config from a YAML file, a shipped config's name, a Config or a mapping; `overrides` are sections
  (`optim={"lr": 1e-4}`, merged into the section) or dotted keys (`**{"optim.lr": 1e-4}`)."""
  if isinstance(config, Config):
    raw = config_lib.to_dict(config)
  elif isinstance(config, Mapping):
    raw = json.loads(json.dumps(config))  # a deep copy
  else:
    path = config_lib.resolve_path(config)
    if not path.is_file():
      config_lib.load(path)  # the one clear error for a missing file
    raw = yaml.safe_load(path.read_text()) or {}
  dotted = []
  for key, value in overrides.items():
    if "." in key or not isinstance(value, Mapping):
      dotted.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the value keeps its type
    else:
      for inner, v in value.items():
        dotted.append(f"{key}.{inner}={json.dumps(v)}")
  for item in dotted:
    config_lib.apply_override(raw, item)
  return config_lib.from_dict(Config, raw)


def finetune(config: str | Path | Config | Mapping[str, Any], run_dir: str | Path | None = None, *,
             resume: bool = False, extend: bool = False, quiet: bool = True, **overrides: Any) -> RunResult:
  """Fine-tunes as `jaxtune finetune` does; run_dir defaults to runs/<config name> (a name or file given)."""
  cfg = make_config(config, **overrides)
  if run_dir is None:
    if isinstance(config, (Config, Mapping)):
      raise UserError("finetune(config=<a Config or mapping>) needs run_dir: there is no config name to name it.")
    run_dir = Path("runs") / Path(config).stem
  distributed.initialize()
  metrics = loop.fit(cfg, str(run_dir), resume=resume, extend=extend, quiet=quiet)
  summary_path = storage.path(run_dir) / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  return RunResult(str(run_dir), metrics, summary, cfg)


def evaluate(run_dir: str | Path, step: str | int = "best", split: str | None = "test", data_file: str | None = None,
             limit: int | None = None) -> dict[str, Any]:
  """A saved step's metrics on a split (or a data file, with split=None), as `jaxtune evaluate`."""
  return evaluate_lib.evaluate_checkpoint(run_dir, str(step), None if data_file else split, data_file, limit)


@dataclasses.dataclass
class Loaded:
  """A model with its params, ready to `predict` (classification) or `generate` (causal LM, seq2seq)."""
  model: Model
  params: Any
  tokenizer: Any
  task: str | None
  labels: list[Any] | None = None
  config: Config | None = None
  model_cfg: ModelConfig | None = None  # where the weights came from (a pretrained load; a run has `config`)

  def predict(self, texts: Sequence[str], max_len: int = 512) -> list[dict[str, Any]]:
    """Each text's label and class probabilities (a classifier's run only)."""
    if self.task != "classification":
      raise UserError(f"predict is for classification runs; this model's task is {self.task}: use generate.")
    max_len = self.config.data.max_len if self.config else max_len
    enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="np")
    batch = {k: jnp.asarray(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    probs = np.asarray(jax.nn.softmax(self.model.apply(self.params, batch)["logits"].astype(jnp.float32), -1))
    return [{"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, map(float, p)))}
            for p in probs]

  def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               num_beams: int = 1, seed: int = 0) -> list[str]:
    """Each prompt's continuation (causal LM, through the run's chat template when it used one) or target
    (seq2seq), decoded without special tokens."""
    s = search.Search(max_new_tokens, temperature, top_p, num_beams)
    rng = jax.random.key(seed)
    if self.task == "seq2seq":
      prefix = self.config.data.source_prefix if self.config else ""
      ids = [np.asarray(r, np.int32) for r in self.tokenizer([prefix + p for p in prompts])["input_ids"]]
      cfg = self.config.model if self.config else self.model_cfg
      out = seq2seq_generation.generate(self.model, self.params, ids, seq2seq_generation.rules_for(self.model, cfg),
                                        s, rng, jnp.float32)
    elif self.task in ("causal_lm", "preference"):
      chat = bool(self.config and self.config.data.use_chat_template)
      ids = [lm.encode_prompt(p, self.tokenizer, chat) for p in prompts]
      out = decoder.generate(self.model, self.params, ids, [lm.eos_id(self.tokenizer)], s, rng)
    else:
      raise UserError(f"generate is for causal_lm, preference and seq2seq models; this model's task is {self.task}: "
                      "use predict.")
    return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def load(path: str | Path, step: str = "latest") -> tuple[Loaded, Any]:
  """(model, tokenizer) of a run directory's step, or of a pretrained causal-LM / seq2seq checkpoint (an HF
  directory, hub id, GGUF file or pkg:// path)."""
  mesh = sharding.make_mesh(config_lib.MeshConfig())
  run = storage.path(path) if storage.is_remote(path) else Path(path)  # not a run: a hub id, pkg:// or GGUF path
  if (run / "config.yaml").exists():
    cfg, model, params, labels, _ = restore.restore(run, step, mesh)
    with storage.local_dir(run / "tokenizer") as local:  # the copy finetune saved beside the checkpoints
      tokenizer = transformers.AutoTokenizer.from_pretrained(local)
    return Loaded(model, params, tokenizer, cfg.task, labels, cfg), tokenizer
  model_cfg = ModelConfig(path=str(path), new_params=())
  hf_config, _ = pretrained.open_checkpoint(model_cfg)
  task = "seq2seq" if hf_config.get("is_encoder_decoder") else "causal_lm"
  model, params = pretrained.from_pretrained(model_cfg, 0, mesh, 0, task)
  tokenizer = pretrained.load_tokenizer(model_cfg)
  return Loaded(model, params, tokenizer, task, model_cfg=model_cfg), tokenizer
