"""The jitted train/eval steps and the fine-tuning loop (eval, logging, checkpoints, resume)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jaxtune import config as config_lib
from jaxtune import metrics as metrics_lib
from jaxtune import optim, pretrained, sharding
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import Config
from jaxtune.data import batching
from jaxtune.errors import UserError
from jaxtune.tasks import TASKS


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any  # pure-dict tree, float32
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step) so resume replays them


def loss_fn(model: pretrained.Model, task: Any, params: Any, batch: dict[str, jax.Array], dtype: jnp.dtype,
            rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(float32 loss summed over the batch's targets / their true count, logits)."""
  logits = model.apply(params, batch, dtype=dtype, dropout_rng=rng)["logits"]
  total, count = task.loss_terms(logits, batch)
  return total / jnp.maximum(count, 1.0), logits


def make_train_step(model: pretrained.Model, task: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, dtype: jnp.dtype, state_shardings: Any, batch_sharding: Any):
  """(state, batch) -> (state, metrics): one AdamW update, jitted once per batch shape, state donated."""

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(lambda p: loss_fn(model, task, p, batch, dtype, rng), has_aux=True)
    (loss, _), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(batch_sharding.mesh)), donate_argnums=0)


def make_eval_step(model: pretrained.Model, task: Any, dtype: jnp.dtype, params_shardings: Any, batch_sharding: Any):
  """(params, batch) -> the task's per-row outputs, replicated so every process can score them."""

  def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    _, logits = loss_fn(model, task, params, batch, dtype, None)
    return task.eval_outputs(logits, batch)

  return jax.jit(step, in_shardings=(params_shardings, batch_sharding),
                 out_shardings=sharding.replicated(batch_sharding.mesh))


def evaluate(eval_step, params: Any, data: Any, cfg: Config, batch_sharding: Any, task: Any,
             labels: Any) -> dict[str, float]:
  """The task's metrics over every row of `data` (a short last batch is padded, then dropped)."""
  outputs: dict[str, list[np.ndarray]] = {}
  for rows in batching.eval_batches(len(data), cfg.train.eval_batch_size):
    batch = task.collate(data, rows, cfg.train.eval_batch_size, cfg)
    for key, value in jax.device_get(eval_step(params, batching.to_device(batch, batch_sharding))).items():
      outputs.setdefault(key, []).append(value[:len(rows)])
  return task.metrics({k: np.concatenate(v) for k, v in outputs.items()}, data, labels)


def check_devices(cfg: Config, mesh: jax.sharding.Mesh, keys: tuple[str, ...] = ("batch_size", "eval_batch_size")
                  ) -> None:
  """Each global batch size in `keys` must split evenly over the batch shards of `mesh`."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in keys:
    if getattr(cfg.train, key) % shards:
      raise UserError(f"config key train.{key}={getattr(cfg.train, key)} is not divisible by the {shards} "
                      "batch shards (mesh.data x mesh.fsdp); make it a multiple.")


def total_steps(cfg: Config, num_rows: int) -> tuple[int, int]:
  """(steps per epoch, total steps) of the run."""
  per_epoch = num_rows // cfg.train.batch_size
  if per_epoch == 0:
    raise UserError(f"the train split has {num_rows} rows, fewer than train.batch_size="
                    f"{cfg.train.batch_size}; lower the batch size.")
  return per_epoch, cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)


@dataclasses.dataclass
class Run:
  """Everything a fine-tuning loop needs, built by `prepare`."""
  cfg: Config
  dir: Path
  ckpts: Checkpoints
  task: Any  # tasks.Classification or tasks.CausalLM
  labels: list[Any] | None  # class names (classification only)
  splits: dict[str, Any]  # name -> encoded rows
  per_epoch: int  # optimiser steps per epoch
  steps: int  # total optimiser steps
  state: TrainState
  train_step: Any
  eval_step: Any
  batch_sharding: Any
  meta: dict[str, Any]  # saved with every checkpoint: what evaluation needs


def prepare(cfg: Config, run_dir: Path, resume: bool = False) -> Run:
  """Checks the config against devices and data, loads the model, restores state on --resume."""
  mesh = sharding.make_mesh(cfg.mesh)
  check_devices(cfg, mesh)
  _check_run_dir(cfg, run_dir, resume)
  task = TASKS[cfg.task]
  tokenizer = pretrained.load_tokenizer(cfg.model)
  names = ["train"] + (["validation"] if cfg.data.validation or cfg.data.validation_holdout else [])
  labels, splits = task.load(cfg, tokenizer, names)
  per_epoch, steps = total_steps(cfg, len(splits["train"]))
  model, params = pretrained.from_pretrained(cfg.model, len(labels or ()), mesh, cfg.train.seed, task.family_kind)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  tx = optim.make(cfg.optim, steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params),
                     jax.random.key_data(jax.random.key(cfg.train.seed)))
  # Optimiser moments inherit their param's sharding through jit; scalars become replicated.
  state_shardings = jax.tree.map(lambda x: sharding.on_mesh(x.sharding, mesh), state)
  state = jax.device_put(state, state_shardings)
  ckpts = _start_run(cfg, run_dir, tokenizer)  # the first write, once everything above checked out
  if resume and ckpts.steps():
    state = _restore(ckpts, state)
  batch_sharding = sharding.batch_sharding(mesh)
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels,
          "config": config_lib.to_dict(cfg), "steps_per_epoch": per_epoch, "mesh": dict(mesh.shape)}
  return Run(cfg, run_dir, ckpts, task, labels, splits, per_epoch, steps, state,
             make_train_step(model, task, tx, optim.schedule(cfg.optim, steps), dtype, state_shardings, batch_sharding),
             make_eval_step(model, task, dtype, state_shardings.params, batch_sharding), batch_sharding, meta)


def fit(cfg: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
  """Fine-tunes per `cfg`, writing logs and checkpoints into run_dir; returns the last eval metrics."""
  run = prepare(cfg, run_dir, resume)
  try:
    return _loop(run)
  finally:  # even when interrupted, let finished checkpoint writes commit
    run.ckpts.wait()
    run.ckpts.close()


def _loop(run: Run) -> dict[str, Any]:
  cfg, state, step = run.cfg, run.state, int(run.state.step)
  log = metrics_lib.RunLog(run.dir, run.steps, step)
  log.write({"step": step, "event": "start", "total_steps": run.steps, "mesh": run.meta["mesh"],
             "processes": jax.process_count()})
  last_eval: dict[str, Any] = {}
  tick, seen = time.perf_counter(), {"examples": 0, "tokens": 0}
  save_every = cfg.checkpoint.save_every or cfg.train.eval_every
  while step < run.steps:
    epoch, offset = divmod(step, run.per_epoch)
    order = batching.train_batches(run.splits["train"].lengths, cfg.train.batch_size, cfg.train.seed, epoch,
                                   cfg.data.group_by_length)
    for rows in order[offset:offset + run.steps - step]:
      batch = run.task.collate(run.splits["train"], rows, cfg.train.batch_size, cfg)
      state, step_metrics = run.train_step(state, batching.to_device(batch, run.batch_sharding))
      step += 1
      seen["examples"] += len(rows)
      seen["tokens"] += int((batch.get("attention_mask", batch.get("segment_ids")) > 0).sum())
      log.advance()
      if step % cfg.train.log_every == 0 or step == run.steps:
        record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}  # waits for the step
        elapsed = time.perf_counter() - tick
        record.update(epoch=step / run.per_epoch, examples_per_s=seen["examples"] / elapsed,
                      tokens_per_s=seen["tokens"] / elapsed)
        log.train(step, record)
      evaluate_now = "validation" in run.splits and (
          step == run.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
      if evaluate_now:
        last_eval = evaluate(run.eval_step, state.params, run.splits["validation"], cfg, run.batch_sharding,
                             run.task, run.labels)
        log.eval(step, "validation", last_eval)
      if step == run.steps or (save_every and step % save_every == 0):
        position = {"epoch": step // run.per_epoch, "batch_in_epoch": step % run.per_epoch}
        run.ckpts.save(step, state.params, state.opt_state, {"step": state.step, "rng": state.rng},
                       {**run.meta, "data_position": position}, last_eval if evaluate_now else None)
      if evaluate_now or step % cfg.train.log_every == 0:  # throughput counts training time only
        tick, seen = time.perf_counter(), {"examples": 0, "tokens": 0}
  log.close()
  return last_eval


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
  """Refuses to mix a new run into an old one's directory, or to resume with a different config."""
  config_path = run_dir / "config.yaml"
  if config_path.exists() and not resume:
    raise UserError(f"run dir {run_dir} already holds a run; pass --resume to continue it or choose a "
                    "new --run-dir (nothing there was changed).")
  if resume and config_path.exists():
    saved = config_lib.load(config_path)
    if dataclasses.replace(saved, train=cfg.train) != dataclasses.replace(cfg, train=saved.train):
      raise UserError(f"--resume: the config differs from {config_path} outside the train section; resume "
                      "with the saved config (or start a new --run-dir).")


def _start_run(cfg: Config, run_dir: Path, tokenizer: Any) -> Checkpoints:
  """Writes config.yaml (atomically) and the tokenizer into run_dir; opens its checkpoints."""
  run_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    config_path = run_dir / "config.yaml"
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    tmp.replace(config_path)
    if not (run_dir / "tokenizer").is_dir():
      tokenizer.save_pretrained(run_dir / "tokenizer")
  return Checkpoints(run_dir, cfg.checkpoint)


def _restore(ckpts: Checkpoints, state: TrainState) -> TrainState:
  """The latest checkpoint's params, optimiser and train state, placed like `state`."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  got = ckpts.restore(ckpts.resolve("latest"), params=abstract.params, opt_state=abstract.opt_state,
                      train={"step": abstract.step, "rng": abstract.rng})
  return TrainState(got["train"]["step"], got["params"], got["opt_state"], got["train"]["rng"])
