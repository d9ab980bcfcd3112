"""The fine-tuning loop: steps, logging, validation cadence, checkpoints, stop requests and the end-of-run report.

`fit` is the whole job (set-up in setup.py, then `loop`); SIGTERM / SIGINT ask the loop to stop after
the current step with a checkpoint, a non-finite step stops it (or is skipped) per train.nonfinite, and
train.early_stopping_patience ends it once the validation metric stops improving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxtune import distributed, errors, storage, tasks
from jaxtune import params as params_lib
from jaxtune.config import Config
from jaxtune.params import Params
from jaxtune.train import perf, runlog, setup, steps, summary


def fit(cfg: Config, run_dir: str | Path | epath.Path, resume: bool = False, clock: perf.RunClock | None = None,
        extend: bool = False, quiet: bool = False) -> dict[str, Any]:
  """Fine-tunes per `cfg`, writing logs, checkpoints, timing.json and summary.json into run_dir; returns the last
  eval metrics.

  SIGTERM or SIGINT during training saves a checkpoint after the current step and raises
  errors.Stopped (exit code 75); a non-finite step under train.nonfinite raises it with code 3.
  """
  clock = clock or perf.RunClock()
  run_dir = storage.path(run_dir)
  run = setup.prepare(cfg, run_dir, resume, clock, extend)
  stop = StopRequests()
  try:
    try:
      with stop.active(), distributed.watching(run.ckpts.dir, run.lock.release):  # a dead peer: exit 75
        state, last_eval, work = loop(run, clock, stop, quiet)
    finally:  # even when interrupted, let finished checkpoint writes commit
      with clock.phase("checkpoint"):
        run.ckpts.wait()
        run.ckpts.close()
    tokens, flops, times = work
    report = clock.report(tokens, flops, mesh=run.model.mesh, steps=times)
    if jax.process_index() == 0:
      with storage.writing(run_dir, kept="every checkpoint"):
        text = perf.write_report(report, run_dir / "timing.json")
      print(text, flush=True)
      early = run.meta.get("early_stopping") or {}
      record = summary.build(cfg, run_dir, report, steps.param_counts(run.model, state), run.model.mesh,
                             int(state.step), run.steps, "early_stopped" if early.get("stopped_at") else "finished")
      if early.get("stopped_at"):
        record["early_stopping"] = early
      with storage.writing(run_dir, kept="every checkpoint"):
        storage.write_text(run_dir / "summary.json", json.dumps(runlog.json_safe(record), indent=2) + "\n")
  finally:
    run.lock.release()
  return last_eval


class _Watch:
  """Per-step host checks of a running loop: non-finite steps, stop signals and time-based saves."""

  def __init__(self, cfg: Config, stop: StopRequests | None):
    self.cfg, self.stop = cfg, stop
    self.skips_in_row = 0
    self.last_save = time.monotonic()

  def check_step(self, log: runlog.RunLog, step: int, record: dict[str, float]) -> None:
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


def loop(run: setup.Run, clock: perf.RunClock | None = None, stop: StopRequests | None = None,
         quiet: bool = False) -> tuple[steps.TrainState, dict[str, Any], tuple[int, float, perf.StepTimes]]:
  """Trains `run` to its last step: (final state, last validation metrics, (real tokens, FLOPs) trained on and the
  loop's step times)."""
  cfg, state, step = run.cfg, run.state, int(run.state.step)
  clock = clock or perf.RunClock()
  log = runlog.RunLog(run.dir, run.steps, step, cfg.train.tensorboard,  # on resume, drops later records
                           runlog.start_wandb(cfg.train.wandb_project, run.dir, run.meta["config"]), quiet)
  sizes = steps.param_counts(run.model, state)
  memory = run.meta.get("step_memory") or {}  # the fit check's: XLA's buffer assignment, one device
  tokenized = run.feed.tokenized  # train rows each process tokenised (None for a stream)
  log.write({"step": step, "event": "resume" if step else "start", "total_steps": run.steps,
             "mesh": run.meta["mesh"], "processes": jax.process_count(), **sizes,
             **({"step_memory_bytes": memory} if memory else {}),
             **({"train_rows_tokenized": tokenized} if tokenized is not None else {})})
  if jax.process_index() == 0:
    print(f"params: {sizes['trainable_params']:,} trainable of {sizes['total_params']:,}; optimiser state "
          f"{sizes['optimizer_state_bytes'] / 2**20:.1f} MiB" + (
              f"; train step {memory['total'] / 2**20:,.1f} MiB per device (frozen params "
              f"{memory['frozen_params'] / 2**20:,.1f}, temporaries {memory['temporaries'] / 2**20:,.1f})"
              if memory else ""), flush=True)
  watch = _Watch(cfg, stop)
  early = EarlyStopping.of(cfg, run.meta.get("early_stopping"))  # on resume, the saved checkpoint's count
  last_eval: dict[str, Any] = {}
  rows_per_step = cfg.train.batch_size * (2 if cfg.task == "preference" else 1)  # DPO: a chosen and a rejected row
  flops_per_token = functools.cache(lambda length: perf.train_flops_per_token(run.model.hf_config, length, cfg.task))
  tick, seen, work = time.perf_counter(), {"examples": 0, "tokens": 0}, [0, 0.0]
  save_every = cfg.checkpoint.save_every or cfg.train.eval_every
  pending = None  # the previous step's (step, length, metrics, throughput or None): read once the next is dispatched
  times = perf.StepTimes(clock)
  stop_now = failed = False
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
        work[1] += rows_per_step * length * flops_per_token(length)
        if pending is not None:
          _read_step(log, run, watch, times, *pending)
        log.advance()
        stop_now, save_for_time = watch.stop_and_save()
        evaluate_now = "validation" in run.splits and (
            step == run.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
        save_now = step == run.steps or (save_every and step % save_every == 0) or save_for_time or stop_now
        logged = step % cfg.train.log_every == 0 or step == run.steps
        pending = step, length, step_metrics, (dict(seen), tick, run.feed.epoch(step)) if logged else None
        if evaluate_now or save_now:  # the state is about to be read anyway; never save past a non-finite step
          _read_step(log, run, watch, times, *pending)
          pending = None
      if evaluate_now:
        with clock.phase("eval"):
          last_eval = validate(run, params_lib.merge(state.params, state.frozen))
        log.eval(step, "validation", last_eval)
        if early.update(step, last_eval) and step < run.steps:
          early.stopped_at = step
          save_now = stop_now = True  # saved, then the run ends as finished (early_stopped in summary.json)
          if jax.process_index() == 0:
            print(f"early stopping at step {step}: validation {early.metric} has not improved on {early.best:.6g} "
                  f"(step {early.best_step}) by more than {early.threshold:g} in {early.bad} evals", flush=True)
        run.meta["early_stopping"] = dataclasses.asdict(early)
      if save_now:
        with clock.phase("checkpoint"):
          log.flush()  # object storage: the log holds every record up to a step before its checkpoint can commit
          run.ckpts.save(step, state.params, state.opt_state,
                         {"step": state.step, "rng": state.rng},
                         {**run.meta, "data_position": run.feed.position(step)},
                         last_eval if evaluate_now else None)
        watch.last_save = time.monotonic()
      if evaluate_now or logged:  # throughput counts training time only
        tick, seen = time.perf_counter(), {"examples": 0, "tokens": 0}
      if stop_now:
        break
    if pending is not None:
      with clock.phase("train"):
        _read_step(log, run, watch, times, *pending)
  except BaseException:
    failed = True
    raise
  finally:
    log.close(failed)
  if stop_now and step < run.steps and not early.stopped_at:
    run.ckpts.wait()
    raise errors.Stopped(f"stopped at step {step}; resume with --resume", errors.EXIT_PREEMPTED)
  return state, last_eval, (*work, times)


@dataclasses.dataclass
class EarlyStopping:
  """HF's EarlyStoppingCallback: `bad` counts evals in a row that did not beat `best` by more than `threshold`."""
  patience: int
  threshold: float
  metric: str
  mode: str  # "max" or "min"
  best: float | None = None
  best_step: int | None = None
  bad: int = 0
  stopped_at: int | None = None

  @classmethod
  def of(cls, cfg: Config, saved: dict[str, Any] | None) -> EarlyStopping:
    best = tasks.checkpoint_config(cfg)
    counts = {k: v for k, v in (saved or {}).items() if k in ("best", "best_step", "bad")}
    return cls(cfg.train.early_stopping_patience, cfg.train.early_stopping_threshold, best.best_metric or "",
               best.best_direction, **counts)

  def update(self, step: int, metrics: dict[str, Any]) -> bool:
    """Counts one eval; True once `patience` evals in a row have not improved."""
    if not self.patience:
      return False
    if self.metric not in metrics:
      raise errors.UserError(f"train.early_stopping_patience watches validation {self.metric!r}, which this task "
                             f"does not report (it reports {sorted(metrics)}); set checkpoint.best_metric to one.")
    value = float(metrics[self.metric])
    better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
    self.bad = 0 if self.best is None or (better and abs(value - self.best) > self.threshold) else self.bad + 1
    if better:
      self.best, self.best_step = value, step
    return self.bad >= self.patience


def validate(run: setup.Run, params: Params) -> dict[str, Any]:
  """The validation split's metrics from the eval step's outputs, and, when the best checkpoint is picked by a
  metric of generated text (seq2seq's default, BLEU), from the model's generations too."""
  data = run.splits["validation"]
  metrics = steps.evaluate(run.eval_step, params, data, run.cfg, run.batch_sharding, run.task, run.labels)
  best = tasks.checkpoint_config(run.cfg).best_metric
  if best and best not in metrics:  # generating costs far more than scoring: only when it decides something
    metrics.update(run.task.generate(run.model, params, data, run.cfg, run.tokenizer)[0])
  return metrics


def _read_step(log: runlog.RunLog, run: setup.Run, watch: _Watch, times: perf.StepTimes, step: int, length: int,
               step_metrics: dict[str, jax.Array], throughput: tuple[dict[str, int], float, float] | None) -> None:
  """Reads step `step`'s metrics (waiting for it, not for any later step): checks them and logs a log step."""
  record = {k: v.item() for k, v in times.read(length, lambda: jax.device_get(step_metrics)).items()}
  if throughput is not None:
    seen, tick, epoch = throughput
    elapsed = time.perf_counter() - tick
    log.train(step, {**{k: v for k, v in record.items() if k != "finite"}, "epoch": epoch,
                     "examples_per_s": seen["examples"] / elapsed, "tokens_per_s": seen["tokens"] / elapsed})
  watch.check_step(log, step, record)


class StopRequests:
  """SIGTERM and SIGINT, while active, ask training to stop after the current step instead of killing it.

  A second SIGINT (Ctrl-C) stops at once with KeyboardInterrupt. Outside the main thread (where
  Python cannot take signals) this does nothing.
  """

  def __init__(self) -> None:
    self.signal: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    print(f"\n{self.signal}: stopping after this step and saving a checkpoint (Ctrl-C again stops at once, "
          "without saving)", file=sys.stderr, flush=True)

  @contextlib.contextmanager
  def active(self) -> Iterator[StopRequests]:
    main = threading.current_thread() is threading.main_thread()
    if main:
      self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in self._previous.items():
        signal.signal(s, handler)
      self._previous = {}
