"""Everything a fine-tuning run needs before its first step, checked before anything is written.

`prepare` checks the config against the devices, opens the checkpoint, tokenizes the data, builds
the model and its state (pretrained weights, or the saved state on --resume) and the jitted steps,
and only then writes the run directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from jaxtune import cli, sharding, storage, tasks
from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune.config import Config, MeshConfig
from jaxtune.data import batching, feed, hostrows
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
from jaxtune.models.model import Model
from jaxtune.tasks import Task
from jaxtune.train import fit, optim, perf, reference, restore, rundir, steps
from jaxtune.train.checkpoints import Checkpoints
from jaxtune.weights import pretrained


def total_steps(cfg: Config, num_rows: int) -> tuple[int, int]:
  """(steps per epoch, total steps) of a run on an in-memory train split of `num_rows` rows."""
  per_epoch = feed.steps_per_epoch(num_rows, cfg.train.batch_size)
  return per_epoch, run_steps(cfg, per_epoch)


def run_steps(cfg: Config, per_epoch: int | None) -> int:
  """train.max_steps, or train.epochs of `per_epoch` steps (a stream, with per_epoch None, has max_steps)."""
  return cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)


@dataclasses.dataclass
class Run:
  """Everything a fine-tuning loop needs, built by `prepare`."""
  cfg: Config
  dir: Path
  ckpts: Checkpoints
  lock: rundir.RunLock  # held from `prepare` until `fit` returns
  model: Model
  tokenizer: Any  # decodes generations (seq2seq validation)
  task: Task
  labels: list[Any] | None  # class names (classification only)
  splits: dict[str, Any]  # name -> encoded rows (no "train" when it is streamed)
  feed: Any  # feed.SplitFeed or feed.StreamFeed: the train batches of each step
  steps: int  # total optimiser steps
  state: steps.TrainState
  train_step: Any
  eval_step: Any
  batch_sharding: Any
  meta: dict[str, Any]  # saved with every checkpoint: what evaluation needs


def prepare(cfg: Config, run_dir: str | Path | epath.Path, resume: bool = False, clock: perf.RunClock | None = None,
            extend: bool = False) -> Run:
  """Checks config, devices, data and model, builds the state (restored on --resume), then writes the run dir.

  Every check runs before the first write: a bad input leaves no new directory and changes no file.
  """
  clock = clock or perf.RunClock()
  run_dir = storage.path(run_dir)
  storage.check(run_dir)  # a missing bucket or refused credentials: one line, before any work
  lock = rundir.RunLock(run_dir)
  created = not run_dir.exists()
  try:
    with clock.phase("setup"):
      perf.use_compile_cache(cfg.train.compile_cache)
      mesh = sharding.make_mesh(cfg.mesh)
      rules = sharding.rules_with(cfg.mesh.rules)
      sharding.check_batch_sizes(cfg.train, mesh, rules)
      if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError(f"train.wandb_project={cfg.train.wandb_project!r} needs Weights & Biases: pip install wandb "
                        "(or set train.wandb_project to an empty string).")
      if not created and jax.process_index() == 0:
        lock.acquire()  # before looking, so that a second writer is refused rather than racing
      rundir.check_run_dir(cfg, run_dir, resume, extend)
    with clock.phase("weights"):  # the model's config first: a wrong model fails before the data is read
      hf_config, reader = pretrained.open_checkpoint(cfg.model)  # opened once: parsing a GGUF file takes seconds
      pretrained.check_kind(hf_config, cfg.model, cfg.task)
    with clock.phase("data"):
      tokenizer = pretrained.load_tokenizer(cfg.model)
      names = ([] if cfg.data.streaming else ["train"]) + (
          ["validation"] if cfg.data.validation or cfg.data.validation_holdout else [])
      labels, splits = tasks.task_for(cfg).load(cfg, tokenizer, names, per_host=jax.process_count() > 1)
      train_feed = _feed(cfg, tokenizer, splits, sharding.batch_sharding(mesh, rules))
    with clock.phase("weights"):
      return _build(cfg, run_dir, resume, mesh, rules, (hf_config, reader), tokenizer, labels, splits, train_feed,
                    lock, created)
  except BaseException:
    lock.release()
    raise


def _feed(cfg: Config, tokenizer: Any, splits: dict[str, Any], batch_sharding: jax.sharding.NamedSharding) -> Any:
  """The train feed: a stream, a split every process encoded whole, or (several processes) one that each
  process tokenises only where its devices hold the rows (feed.HostFeed)."""
  t = cfg.train
  if cfg.data.streaming:
    return feed.StreamFeed(tasks.task_for(cfg).stream(cfg, tokenizer))
  if isinstance(splits["train"], hostrows.Rows):
    part = batching.local_rows(batch_sharding, t.batch_size)
    return feed.HostFeed(splits["train"], t.batch_size, t.seed, cfg.data.group_by_length, part,
                         total_steps(cfg, len(splits["train"]))[1])
  return feed.SplitFeed(splits["train"], t.batch_size, t.seed, cfg.data.group_by_length)


def _build(cfg: Config, run_dir: epath.Path, resume: bool, mesh: jax.sharding.Mesh, rules: sharding.Rules,
           checkpoint: tuple[dict[str, Any], Any], tokenizer: Any, labels: Any, splits: dict[str, Any],
           train_feed: Any, lock: rundir.RunLock, created: bool) -> Run:
  """The rest of `prepare`, once the data is loaded: model, state (loaded or restored) and the jitted steps."""
  task = tasks.task_for(cfg)
  total = run_steps(cfg, train_feed.per_epoch)
  hf_config, reader = checkpoint
  model = pretrained.from_config(hf_config, cfg.model, len(labels or ()), mesh, cfg.train.seed, cfg.task,
                                 rules)
  check_fits_model(cfg, model, {**splits, "train": train_feed} if cfg.data.streaming else splits)
  tx = optim.make(cfg.optim, total)
  shardings = steps.state_shardings(model, tx)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  train_step = steps.make_train_step(model, task, tx, optim.schedule(cfg.optim, total), dtype, shardings,
                                     batch_sharding, cfg.train.grad_accum, cfg.model.remat,
                                     cfg.train.nonfinite == "skip", cfg.train.loss_vocab_block)
  # Before any weight is read: the step compiled for these devices must fit them (the first step reuses it).
  memory = fit.check(cfg, steps.abstract_state(model, tx, shardings), train_step, batch_sharding,
                     lambda c: _described(c, hf_config, len(labels or ()), mesh, rules))
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels, "config": config_lib.to_dict(cfg), "steps_per_epoch": train_feed.per_epoch,
          "mesh": dict(mesh.shape), "step_memory": memory}
  precomputed = cfg.task == "preference" and cfg.preference.reference == "precomputed"
  if resume:  # straight into the saved state: of the pretrained weights only frozen params are read
    if precomputed:
      reference.restore(run_dir, splits)
    ckpts = Checkpoints(run_dir, tasks.checkpoint_config(cfg))
    state, saved_meta = restore.resume_state(
        ckpts, steps.abstract_state(model, tx, shardings),
        lambda: pretrained.load_params(model, cfg.model, reader, cfg.train.seed, model.frozen))
    rundir.check_resumable(saved_meta, int(state.step), train_feed, total)
    early = meta["early_stopping"] = saved_meta.get("early_stopping")  # the patience count goes on from there
    patience = cfg.train.early_stopping_patience
    if early and early.get("stopped_at") == int(state.step) and patience and early["bad"] >= patience:
      raise UserError(f"--resume: the run stopped early at step {early['stopped_at']} (validation {early['metric']} "
                      f"last improved at step {early['best_step']}); raise train.early_stopping_patience above "
                      f"{early['bad']} or set it to 0 to train it further.")
    rundir.write_config(cfg, run_dir)  # the allowed changes (mesh, eval cadence, --extend) are now the run's
    cli.log_details_to(run_dir, jax.process_index())  # resumed: third-party records go to the run dir from now on
  else:
    params = pretrained.load_params(model, cfg.model, reader, cfg.train.seed)
    state = steps.init_state(model, params, tx, cfg.train.seed, shardings)
    if precomputed:  # DPO: the starting weights are the reference policy
      reference.precompute(model, task, params_lib.merge(state.params, state.frozen), splits, cfg, batch_sharding)
    ckpts = rundir.start_run(cfg, run_dir, tokenizer, lock, created)  # the first write, once everything checked out
    if precomputed:
      reference.save(run_dir, splits)
  return Run(cfg, run_dir, ckpts, lock, model, tokenizer, task, labels, splits, train_feed, total, state, train_step,
             steps.make_eval_step(model, task, dtype, batch_sharding, cfg.train.loss_vocab_block), batch_sharding, meta)


def _described(cfg: Config, hf_config: dict[str, Any], num_labels: int, mesh: jax.sharding.Mesh,
               rules: sharding.Rules) -> tuple[Model, dict[str, int]]:
  """A changed config's model, described on one host device, and its mesh shape here: what the fit check's
  suggestions are estimated from."""
  host = sharding.make_mesh(MeshConfig(data=1), jax.devices("cpu")[:1])
  model = pretrained.from_config(hf_config, cfg.model, num_labels, host, cfg.train.seed, cfg.task, rules)
  return model, dict(zip(sharding.MESH_AXES, sharding.mesh_sizes(cfg.mesh, mesh.devices.size), strict=True))


def check_fits_model(cfg: Config, model: Model, splits: dict[str, Any]) -> None:
  """The data's lengths and token ids must fit the model's position table and vocabulary."""
  positions = FAMILIES[model.family].max_positions(model.cfg)
  lengths = {"data.max_len": cfg.data.max_len, **({"data.max_target_len": cfg.data.max_target_len}
                                                   if cfg.task == "seq2seq" else {})}
  for key, length in lengths.items():
    if positions is not None and length > positions:
      raise UserError(f"{key}={length} is longer than {cfg.model.path}'s {positions} positions; set {key} (and "
                      f"data.length_buckets) to at most {positions}.")
  vocab = model.cfg.vocab_size
  for name, data in splits.items():
    largest = data.max_token_id
    if largest >= vocab:
      raise UserError(f"data split {name}: the tokenizer gives token id {largest}, but {cfg.model.path} has only "
                      f"{vocab} embeddings; use the model's own tokenizer (model.tokenizer) or a model that fits it.")
