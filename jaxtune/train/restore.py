"""Reading a run back: the params of a saved step (for evaluation and export), and the whole train state (--resume).

Checkpoints hold the trainable params only; frozen params (model.freeze, the base under LoRA) are read
again from the checkpoint the run started from, which the saved config names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune import sharding, storage, tasks
from jaxtune.config import CheckpointConfig, Config, ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
from jaxtune.models.model import Model, describe
from jaxtune.params import Params
from jaxtune.train import steps
from jaxtune.train.checkpoints import Checkpoints
from jaxtune.weights import pretrained


def load_run_config(run_dir: str | Path | epath.Path) -> Config:
  path = storage.path(run_dir) / "config.yaml"
  if not path.is_file():
    raise UserError(f"{run_dir} has no config.yaml; pass the --run-dir of a finetune.py run to --checkpoint.")
  return config_lib.load(path)


def restore_step(run_dir: str | Path | epath.Path, step: str,
                 mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], Model, Any, int]:
  """(meta, model, params, step number) of a saved step, params only, placed in their shardings."""
  run_dir = storage.path(run_dir)
  storage.check(run_dir)
  # config.yaml only says which metric 'best' means; a checkpoints/ dir copied alone has no best step.
  has_config = (run_dir / "config.yaml").is_file()
  ckpt_cfg = tasks.checkpoint_config(load_run_config(run_dir)) if has_config else CheckpointConfig()
  ckpts = Checkpoints(run_dir, ckpt_cfg, read_only=True)
  models: dict[int, Model] = {}

  def targets(meta: dict[str, Any]) -> dict[str, Any]:
    family = FAMILIES[meta["family"]]
    model = models[id(meta)] = describe(meta["family"], family.config(**meta["model"]), mesh,
                                        hf_config=meta.get("hf_config"), model_cfg=model_config(meta))
    return {"params": sharding.placed(model.split(model.abstract)[0], model.split(model.shardings)[0])}

  if step == "latest":  # the newest checkpoint that reads back; damaged newer ones are named and skipped
    step_num, meta, got = ckpts.restore_latest(targets)
  else:
    step_num = ckpts.resolve(step)
    meta = ckpts.read_meta(step_num)
    got = ckpts.restore(step_num, **targets(meta))
  ckpts.close()
  model, params = models[id(meta)], got["params"]
  if model.frozen:  # checkpoints hold the trainable params; the frozen ones are the base model's
    model_cfg = model_config(meta)
    _, reader = pretrained.open_checkpoint(model_cfg)
    params = params_lib.merge(params, pretrained.load_params(model, model_cfg, reader, 0, model.frozen))
  return meta, model, params, step_num


def model_config(meta: dict[str, Any]) -> ModelConfig | None:
  """The model section of the config a checkpoint was trained with (None in metadata without it)."""
  raw = (meta.get("config") or {}).get("model")
  return config_lib.from_dict(ModelConfig, raw, "model.") if raw else None


def restore(run_dir: str | Path | epath.Path, step: str,
            mesh: jax.sharding.Mesh) -> tuple[Config, Model, Any, Any, Any]:
  """(config, model, params, labels, step number) of a saved step; step 'base' = the pretrained weights."""
  run_dir = storage.path(run_dir)
  storage.check(run_dir)
  if step == "base":  # what fine-tuning started from: the new params (a head) are freshly initialised
    run_cfg = load_run_config(run_dir)
    ckpts = Checkpoints(run_dir, read_only=True)
    labels = ckpts.meta(ckpts.resolve("latest"))["labels"] if ckpts.steps() else None
    model, params = pretrained.from_pretrained(run_cfg.model, len(labels or ()), mesh, run_cfg.train.seed,
                                               run_cfg.task)
    return run_cfg, model, params, labels, 0
  meta, model, params, step_num = restore_step(run_dir, step, mesh)
  cfg = config_lib.from_dict(Config, meta["config"])  # the config this checkpoint was trained with
  return cfg, model, params, meta["labels"], step_num


def resume_state(ckpts: Checkpoints, target: steps.TrainState,
                 load_frozen: Callable[[], Params]) -> tuple[steps.TrainState, dict[str, Any]]:
  """(state, meta) of the newest readable checkpoint, read into `target`'s shardings; unreadable ones set aside.

  Checkpoints hold the trainable params only; `load_frozen()` gives the rest, from the base model.
  """
  items = {"params": target.params, "opt_state": target.opt_state, "train": {"step": target.step, "rng": target.rng}}
  _, meta, got = ckpts.restore_latest(lambda meta: items, set_aside=True)
  frozen = load_frozen() if target.frozen else {}
  return steps.TrainState(got["train"]["step"], got["params"], frozen, got["opt_state"], got["train"]["rng"]), meta
