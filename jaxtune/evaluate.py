"""Scores a saved checkpoint in a fresh process: needs only the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import transformers
import yaml

from jaxtune import config as config_lib
from jaxtune import pretrained, sharding, train
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import Config
from jaxtune.data import classification
from jaxtune.errors import UserError


def load_run_config(run_dir: Path) -> Config:
  path = run_dir / "config.yaml"
  if not path.is_file():
    raise UserError(f"{run_dir} has no config.yaml; pass the --run-dir of a finetune.py run to --checkpoint.")
  return config_lib.from_dict(Config, yaml.safe_load(path.read_text()))


def evaluate_checkpoint(run_dir: Path, step: str = "latest", split: str | None = None,
                        data_file: str | None = None) -> dict[str, Any]:
  """Restores the params (only) of one saved step and scores a split of the run's data or a file."""
  if (split is None) == (data_file is None):
    raise UserError("give exactly one of --split NAME or --data FILE.")
  ckpts = Checkpoints(run_dir, load_run_config(run_dir).checkpoint, read_only=True)
  step_num = ckpts.resolve(step)
  meta = ckpts.meta(step_num)
  cfg = config_lib.from_dict(Config, meta["config"])  # the config this checkpoint was trained with
  mesh = sharding.make_mesh(config_lib.MeshConfig())  # evaluation runs on whatever devices are here
  train.check_devices(cfg, mesh, keys=("eval_batch_size",))
  family = pretrained.FAMILIES[meta["family"]]
  model = pretrained.describe(meta["family"], family.config(**meta["model"]), mesh)
  tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")
  name = split or "file"
  _, data = classification.load_splits(cfg.data, cfg.train.seed, tokenizer, [name], labels=meta["labels"],
                                       extra={"file": data_file} if data_file else None)
  flat_shardings = sharding.flatten(model.shardings)
  abstract = sharding.unflatten({p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_shardings[p])
                                 for p, a in model.abstract.items()})
  params = ckpts.restore(step_num, params=abstract)["params"]
  ckpts.close()
  batch_sharding = sharding.batch_sharding(mesh)
  eval_step = train.make_eval_step(model, jnp.dtype(cfg.model.compute_dtype), model.shardings, batch_sharding)
  result = train.evaluate(eval_step, params, data[name], cfg, batch_sharding, len(meta["labels"]))
  return {**result, "step": step_num, "split": split or data_file}


def write_json(result: dict[str, Any], path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  tmp.replace(path)
