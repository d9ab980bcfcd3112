"""The fine-tuning loop (eval, logging, checkpoints, resume) around the jitted steps of `steps.py`."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxtune import config as config_lib
from jaxtune import errors, optim, perf, pretrained, rundir, runs, sharding, steps, summary
from jaxtune import metrics as metrics_lib
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import Config
from jaxtune.data import feed
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
from jaxtune.tasks import TASKS


def check_devices(cfg: Config, mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.RULES,
                  keys: tuple[str, ...] = ("batch_size", "eval_batch_size")) -> None:
  """Each global batch size in `keys` (a train microbatch for batch_size) splits evenly over the batch shards."""
  shards = sharding.batch_shards(mesh, rules)
  axes = " x ".join(f"mesh.{a}" for a in dict(rules)["batch"])
  for key in keys:
    size = getattr(cfg.train, key)
    what = f"train.{key}={size}"
    if key == "batch_size" and cfg.train.grad_accum > 1:
      size //= cfg.train.grad_accum
      what = f"train.batch_size / train.grad_accum = {size}"
    if size % shards:
      raise UserError(f"config key {what} is not divisible by the {shards} batch shards ({axes}); make it a "
                      "multiple.")


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
  model: pretrained.Model
  task: Any  # tasks.Classification or tasks.CausalLM
  labels: list[Any] | None  # class names (classification only)
  splits: dict[str, Any]  # name -> encoded rows (no "train" when it is streamed)
  feed: Any  # feed.SplitFeed or feed.StreamFeed: the train batches of each step
  steps: int  # total optimiser steps
  state: steps.TrainState
  train_step: Any
  eval_step: Any
  batch_sharding: Any
  meta: dict[str, Any]  # saved with every checkpoint: what evaluation needs


def prepare(cfg: Config, run_dir: Path, resume: bool = False, clock: perf.RunClock | None = None,
            extend: bool = False) -> Run:
  """Checks config, devices, data and model, builds the state (restored on --resume), then writes the run dir.

  Every check runs before the first write: a bad input leaves no new directory and changes no file.
  """
  clock = clock or perf.RunClock()
  lock = rundir.RunLock(run_dir)
  created = not run_dir.exists()
  try:
    with clock.phase("setup"):
      perf.use_compile_cache(cfg.train.compile_cache)
      mesh = sharding.make_mesh(cfg.mesh)
      rules = sharding.rules_with(cfg.mesh.rules)
      check_devices(cfg, mesh, rules)
      if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError(f"train.wandb_project={cfg.train.wandb_project!r} needs Weights & Biases: pip install wandb "
                        "(or set train.wandb_project to an empty string).")
      if not created and jax.process_index() == 0:
        lock.acquire()  # before looking, so that a second writer is refused rather than racing
      runs.check_run_dir(cfg, run_dir, resume, extend)
    with clock.phase("weights"):  # the model's config first: a wrong model fails before the data is read
      hf_config, reader = pretrained.open_checkpoint(cfg.model)  # opened once: parsing a GGUF file takes seconds
      pretrained.check_kind(hf_config, cfg.model, cfg.task)
    with clock.phase("data"):
      tokenizer = pretrained.load_tokenizer(cfg.model)
      names = ([] if cfg.data.streaming else ["train"]) + (
          ["validation"] if cfg.data.validation or cfg.data.validation_holdout else [])
      labels, splits = TASKS[cfg.task].load(cfg, tokenizer, names)
      if cfg.data.streaming:
        train_feed = feed.StreamFeed(TASKS[cfg.task].stream(cfg, tokenizer))
      else:
        train_feed = feed.SplitFeed(splits["train"], cfg.train.batch_size, cfg.train.seed, cfg.data.group_by_length)
    with clock.phase("weights"):
      return _build(cfg, run_dir, resume, mesh, rules, (hf_config, reader), tokenizer, labels, splits, train_feed,
                    lock, created)
  except BaseException:
    lock.release()
    raise


def _build(cfg: Config, run_dir: Path, resume: bool, mesh: jax.sharding.Mesh, rules: sharding.Rules,
           checkpoint: tuple[dict[str, Any], Any], tokenizer: Any, labels: Any, splits: dict[str, Any],
           train_feed: Any, lock: rundir.RunLock, created: bool) -> Run:
  """The rest of `prepare`, once the data is loaded: model, state (loaded or restored) and the jitted steps."""
  task = TASKS[cfg.task]
  total = run_steps(cfg, train_feed.per_epoch)
  hf_config, reader = checkpoint
  model = pretrained.from_config(hf_config, cfg.model, len(labels or ()), mesh, cfg.train.seed, cfg.task,
                                 rules)
  check_fits_model(cfg, model, {**splits, "train": train_feed} if cfg.data.streaming else splits)
  tx = optim.make(cfg.optim, total)
  shardings = steps.state_shardings(model, tx)
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels, "config": config_lib.to_dict(cfg), "steps_per_epoch": train_feed.per_epoch,
          "mesh": dict(mesh.shape)}
  if resume:  # straight into the saved state: of the pretrained weights only frozen params are read
    ckpts = Checkpoints(run_dir, cfg.checkpoint)
    state, saved_meta = _restore(ckpts, steps.abstract_state(model, tx, shardings), model.frozen,
                                 lambda: pretrained.load_params(model, cfg.model, reader, cfg.train.seed, model.frozen))
    runs.check_resumable(saved_meta, int(state.step), train_feed, total)
    runs.write_config(cfg, run_dir)  # the allowed changes (mesh, eval cadence, --extend) are now the run's
  else:
    params = pretrained.load_params(model, cfg.model, reader, cfg.train.seed)
    state = steps.init_state(params, tx, cfg.train.seed, shardings, model.frozen)
    ckpts = runs.start_run(cfg, run_dir, tokenizer, lock, created)  # the first write, once everything checked out
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  schedule = optim.schedule(cfg.optim, total)
  train_step = steps.make_train_step(model, task, tx, schedule, dtype, shardings, batch_sharding, cfg.train.grad_accum,
                                     cfg.model.remat, cfg.train.nonfinite == "skip")
  return Run(cfg, run_dir, ckpts, lock, model, task, labels, splits, train_feed, total, state, train_step,
             steps.make_eval_step(model, task, dtype, shardings.params, batch_sharding), batch_sharding, meta)


def check_fits_model(cfg: Config, model: pretrained.Model, splits: dict[str, Any]) -> None:
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


def fit(cfg: Config, run_dir: Path, resume: bool = False, clock: perf.RunClock | None = None,
        extend: bool = False, quiet: bool = False) -> dict[str, Any]:
  """Fine-tunes per `cfg`, writing logs, checkpoints, timing.json and summary.json into run_dir; returns the last
  eval metrics.

  SIGTERM or SIGINT during training saves a checkpoint after the current step and raises
  errors.Stopped (exit code 75); a non-finite step under train.nonfinite raises it with code 3.
  """
  clock = clock or perf.RunClock()
  run = prepare(cfg, run_dir, resume, clock, extend)
  stop = rundir.StopRequests()
  try:
    try:
      with stop.active():
        state, last_eval, work = loop(run, clock, stop, quiet)
    finally:  # even when interrupted, let finished checkpoint writes commit
      with clock.phase("checkpoint"):
        run.ckpts.wait()
        run.ckpts.close()
    report = clock.report(*work)
    if jax.process_index() == 0:
      print(perf.write_report(report, run_dir / "timing.json"), flush=True)
      record = summary.build(cfg, run_dir, report, steps.param_counts(run.model, state), run.meta["mesh"],
                             int(state.step), run.steps, "finished")
      rundir.write_text(run_dir / "summary.json", json.dumps(metrics_lib.json_safe(record), indent=2) + "\n")
  finally:
    run.lock.release()
  return last_eval


class _Watch:
  """Per-step host checks of a running loop: non-finite steps, stop signals and time-based saves."""

  def __init__(self, cfg: Config, stop: rundir.StopRequests | None):
    self.cfg, self.stop = cfg, stop
    self.skips_in_row = 0
    self.last_save = time.monotonic()

  def check_step(self, log: metrics_lib.RunLog, step: int, record: dict[str, float]) -> None:
    """After step `step`'s metrics are read: raises Stopped for a non-finite step unless it may be skipped."""
    if record["finite"]:
      self.skips_in_row = 0
      return
    what = "loss" if not math.isfinite(record["loss"]) else "gradient norm"
    value = record["loss"] if what == "loss" else record["grad_norm"]
    if self.cfg.train.nonfinite == "skip":
      self.skips_in_row += 1
      log.write({"step": step, "event": "skipped_update", "nonfinite": what, "value": str(value)})
      if self.skips_in_row < self.cfg.train.nonfinite_max_skips:
        return
      raise errors.Stopped(f"error: step {step}: the {what} was {value} for {self.skips_in_row} steps in a row "
                           f"(train.nonfinite_max_skips={self.cfg.train.nonfinite_max_skips}); none of those "
                           "updates was applied and the run stopped, keeping its checkpoints. Lower optim.lr or "
                           "check the data.", errors.EXIT_NONFINITE)
    raise errors.Stopped(f"error: step {step}: the {what} is {value}; the run stopped (train.nonfinite: stop) and "
                         "saved nothing from that step on, keeping its earlier checkpoints. Lower optim.lr or check "
                         "the data, or set train.nonfinite=skip to drop such steps.", errors.EXIT_NONFINITE)

  def stop_and_save(self) -> tuple[bool, bool]:
    """(stop after this step, save this step for time): the same answer on every process."""
    minutes = self.cfg.checkpoint.save_every_minutes
    flags = np.array([self.stop is not None and self.stop.signal is not None,
                      minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes], np.int32)
    if jax.process_count() > 1:  # a signal may reach the processes at different steps
      flags = multihost_utils.process_allgather(flags).reshape(-1, 2).max(axis=0)
    return bool(flags[0]), bool(flags[1])


def loop(run: Run, clock: perf.RunClock | None = None, stop: rundir.StopRequests | None = None,
         quiet: bool = False) -> tuple[steps.TrainState, dict[str, Any], tuple[int, float]]:
  """Trains `run` to its last step: (final state, last validation metrics, (real tokens, FLOPs) trained on)."""
  cfg, state, step = run.cfg, run.state, int(run.state.step)
  clock = clock or perf.RunClock()
  log = metrics_lib.RunLog(run.dir, run.steps, step, cfg.train.tensorboard,  # on resume, drops later records
                           metrics_lib.start_wandb(cfg.train.wandb_project, run.dir, run.meta["config"]), quiet)
  sizes = steps.param_counts(run.model, state)
  log.write({"step": step, "event": "resume" if step else "start", "total_steps": run.steps,
             "mesh": run.meta["mesh"], "processes": jax.process_count(), **sizes})
  if jax.process_index() == 0:
    print(f"params: {sizes['trainable_params']:,} trainable of {sizes['total_params']:,}; optimiser state "
          f"{sizes['optimizer_state_bytes'] / 2**20:.1f} MiB", flush=True)
  watch = _Watch(cfg, stop)
  last_eval: dict[str, Any] = {}
  flops_per_token = functools.cache(lambda length: perf.train_flops_per_token(run.model.hf_config, length, cfg.task))
  tick, seen, work = time.perf_counter(), {"examples": 0, "tokens": 0}, [0, 0.0]
  save_every = cfg.checkpoint.save_every or cfg.train.eval_every
  pending = None  # the previous step's (step, metrics, throughput or None): read once the next is dispatched
  stop_now = False
  try:
    for data, rows in run.feed.batches(step, run.steps):
      with clock.phase("train"):
        batch = steps.device_batch(run.task, data, rows, cfg.train.batch_size, cfg, run.batch_sharding)
        state, step_metrics = run.train_step(state, batch)
        clock.mark_first_step()
        step += 1
        tokens = int(data.lengths[rows].sum())  # real tokens
        seen["examples"] += len(rows)
        seen["tokens"] += tokens
        length = batch["input_ids"].shape[1]
        work[0] += tokens
        work[1] += cfg.train.batch_size * length * flops_per_token(length)
        if pending is not None:
          _read_step(log, run, watch, *pending)
        log.advance()
        stop_now, save_for_time = watch.stop_and_save()
        evaluate_now = "validation" in run.splits and (
            step == run.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
        save_now = step == run.steps or (save_every and step % save_every == 0) or save_for_time or stop_now
        logged = step % cfg.train.log_every == 0 or step == run.steps
        pending = step, step_metrics, (dict(seen), tick, run.feed.epoch(step)) if logged else None
        if evaluate_now or save_now:  # the state is about to be read anyway; never save past a non-finite step
          _read_step(log, run, watch, *pending)
          pending = None
      if evaluate_now:
        with clock.phase("eval"):
          last_eval = steps.evaluate(run.eval_step, state.params, run.splits["validation"], cfg, run.batch_sharding,
                               run.task, run.labels)
        log.eval(step, "validation", last_eval)
      if save_now:
        with clock.phase("checkpoint"):
          run.ckpts.save(step, steps.trainable(state.params, run.model.frozen), state.opt_state,
                         {"step": state.step, "rng": state.rng},
                         {**run.meta, "data_position": run.feed.position(step)},
                         last_eval if evaluate_now else None)
        watch.last_save = time.monotonic()
      if evaluate_now or logged:  # throughput counts training time only
        tick, seen = time.perf_counter(), {"examples": 0, "tokens": 0}
      if stop_now:
        break
    if pending is not None:
      _read_step(log, run, watch, *pending)
  finally:
    log.close()
  if stop_now and step < run.steps:
    run.ckpts.wait()
    raise errors.Stopped(f"stopped at step {step}; resume with --resume", errors.EXIT_PREEMPTED)
  return state, last_eval, tuple(work)


def _read_step(log: metrics_lib.RunLog, run: Run, watch: _Watch, step: int, step_metrics: dict[str, jax.Array],
               throughput: tuple[dict[str, int], float, float] | None) -> None:
  """Reads step `step`'s metrics (waiting for it, not for any later step): checks them and logs a log step."""
  record = {k: v.item() for k, v in jax.device_get(step_metrics).items()}
  if throughput is not None:
    seen, tick, epoch = throughput
    elapsed = time.perf_counter() - tick
    log.train(step, {**{k: v for k, v in record.items() if k != "finite"}, "epoch": epoch,
                     "examples_per_s": seen["examples"] / elapsed, "tokens_per_s": seen["tokens"] / elapsed})
  watch.check_step(log, step, record)


def _restore(ckpts: Checkpoints, target: steps.TrainState, frozen: frozenset[str],
             load_frozen: Any) -> tuple[steps.TrainState, dict[str, Any]]:
  """(state, meta) of the newest readable checkpoint, read into `target`'s shardings; unreadable ones set aside.

  Checkpoints hold the trainable params only; `load_frozen()` gives the rest (flat), from the base model.
  """
  items = {"params": steps.trainable(target.params, frozen), "opt_state": target.opt_state,
           "train": {"step": target.step, "rng": target.rng}}
  _, meta, got = ckpts.restore_latest(lambda meta: items, set_aside=True)
  every = sharding.unflatten({**sharding.flatten(got["params"]), **(load_frozen() if frozen else {})})
  return steps.TrainState(got["train"]["step"], every, got["opt_state"], got["train"]["rng"]), meta
