"""The jitted train/eval steps and the fine-tuning loop (eval, logging, checkpoints, resume)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxtune import config as config_lib
from jaxtune import errors, lora, optim, perf, pretrained, rundir, runs, sharding, summary
from jaxtune import metrics as metrics_lib
from jaxtune.checkpoint import Checkpoints
from jaxtune.config import Config
from jaxtune.data import batching, feed
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
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


def trainable(params: Any, frozen: frozenset[str]) -> Any:
  """The params that train (a nested tree like `params`): all but the `frozen` paths (model.freeze, LoRA)."""
  return sharding.unflatten(lora.split(sharding.flatten(params), frozen)[0])


def state_shardings(model: pretrained.Model, tx: optax.GradientTransformation) -> TrainState:
  """Where each leaf of the train state lives: params per the rules, moments like their param.

  Frozen params (model.frozen) have no optimiser state."""
  replicated = sharding.replicated(model.mesh)
  abstract_opt = jax.eval_shape(tx.init, trainable(sharding.unflatten(model.abstract), model.frozen))
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable(model.shardings, model.frozen),
                              transform_non_params=lambda _: replicated)
  return TrainState(replicated, model.shardings, opt, replicated)


def initial_state(params: Any, tx: optax.GradientTransformation, seed: int,
                  frozen: frozenset[str] = frozenset()) -> TrainState:
  """Step 0 of training from `params`: fresh optimiser state for the trainable ones, the base dropout key."""
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable(params, frozen)),
                    jax.random.key_data(jax.random.key(seed)))


def abstract_state(model: pretrained.Model, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """The train state's shapes, dtypes and shardings, allocating nothing (a restore target)."""
  state = jax.eval_shape(lambda p: initial_state(p, tx, 0, model.frozen), sharding.unflatten(model.abstract))
  return sharding.placed(state, shardings)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, shardings: TrainState,
               frozen: frozenset[str] = frozenset()) -> TrainState:
  """`initial_state` around `params` (donated), its optimiser state created directly in its shardings."""
  return jax.jit(lambda p: initial_state(p, tx, seed, frozen), out_shardings=shardings, donate_argnums=0)(params)


def param_counts(model: pretrained.Model, state: TrainState) -> dict[str, int]:
  """Trainable and total param counts, and the optimiser state's bytes (frozen params have none)."""
  total = sum(math.prod(a.shape) for a in model.abstract.values())
  train_count = sum(math.prod(a.shape) for p, a in model.abstract.items() if p not in model.frozen)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  return {"trainable_params": train_count, "total_params": total, "optimizer_state_bytes": int(opt_bytes)}


def make_train_step(model: pretrained.Model, task: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, dtype: jnp.dtype, shardings: TrainState, batch_sharding: Any,
                    grad_accum: int = 1, remat: str = "none", skip_nonfinite: bool = False):
  """(state, batch) -> (state, metrics): one AdamW update, jitted once per batch shape, state donated.

  With grad_accum = K the batch runs as K microbatches in a scan; the summed loss and gradients
  are divided once by the target count of the whole batch, so the update equals the big batch's.
  metrics["finite"] is False for a non-finite loss or gradient norm. With skip_nonfinite such a step
  leaves params and optimiser state unchanged (train.nonfinite: skip). Without it (stop) the loop
  ends the run on reading that flag, before any later checkpoint; the select costs copies of the
  AdamW moments in XLA:CPU's fused update, so it is only compiled in when asked for.
  """

  def summed(params: Any, fixed: dict[str, jax.Array], batch: dict[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(loss summed over the batch's targets, their count, gradient of the sum w.r.t. the trainable params)."""
    def total(p: Any) -> tuple[jax.Array, jax.Array]:
      every = sharding.unflatten({**sharding.flatten(p), **fixed})
      logits = model.apply(every, batch, dtype=dtype, dropout_rng=rng, remat=remat)["logits"]
      return task.loss_terms(logits, batch)

    (loss_sum, count), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss_sum, count, grads

  def accumulated(params: Any, fixed: dict[str, jax.Array], batch: dict[str, jax.Array],
                  rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    def body(acc: Any, xs: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[Any, None]:
      i, micro = xs
      return jax.tree.map(jnp.add, acc, summed(params, fixed, micro, jax.random.fold_in(rng, i))), None

    zero_grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params),
                                                  trainable(shardings.params, model.frozen))
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_grads)
    return jax.lax.scan(body, zero, (jnp.arange(grad_accum), microbatches(batch, grad_accum, batch_sharding)))[0]

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    train_flat, fixed = lora.split(sharding.flatten(state.params), model.frozen)
    train_params = sharding.unflatten(train_flat)
    loss_sum, count, grads = (summed if grad_accum == 1 else accumulated)(train_params, fixed, batch, rng)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    params = sharding.unflatten({**sharding.flatten(optax.apply_updates(train_params, updates)), **fixed})
    loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # params and moments stay as they were; the batch still counts as consumed
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state),
                                       (state.params, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(batch_sharding.mesh)), donate_argnums=0)


def microbatches(batch: dict[str, jax.Array], k: int, batch_sharding: Any) -> dict[str, jax.Array]:
  """K x B/K microbatches; microbatch i takes rows i, i+K, ... so each is spread over every batch shard."""
  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(batch_sharding.mesh, spec))

  return jax.tree.map(split, batch)


def make_eval_step(model: pretrained.Model, task: Any, dtype: jnp.dtype, params_shardings: Any, batch_sharding: Any):
  """(params, batch) -> the task's per-row outputs, replicated so every process can score them."""

  def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    _, logits = loss_fn(model, task, params, batch, dtype, None)
    return task.eval_outputs(logits, batch)

  return jax.jit(step, in_shardings=(params_shardings, batch_sharding),
                 out_shardings=sharding.replicated(batch_sharding.mesh))


def device_batch(task: Any, data: Any, rows: np.ndarray, batch_size: int, cfg: Config,
                 batch_sharding: Any) -> dict[str, jax.Array]:
  """The global batch of `rows`, sharded; this process builds and transfers only its own rows."""
  part = batching.local_rows(batch_sharding, batch_size)
  return batching.to_device(task.collate(data, rows, batch_size, cfg, part), batch_sharding)


def evaluate(eval_step, params: Any, data: Any, cfg: Config, batch_sharding: Any, task: Any,
             labels: Any, outputs: dict[str, np.ndarray] | None = None) -> dict[str, float]:
  """The task's metrics over every row of `data` (a short last batch is padded, then dropped).

  Rows go through shortest first, so each batch pads to the bucket of rows of similar length (fewer pad
  tokens than in data order); outputs are put back in data order (per-token ones padded with zeros to the
  widest batch), and into `outputs` when given.
  """
  order = np.argsort(data.lengths, kind="stable")
  parts: dict[str, list[np.ndarray]] = {}

  def collect(rows: np.ndarray, out: dict[str, jax.Array]) -> None:
    for key, value in jax.device_get(out).items():
      parts.setdefault(key, []).append(value[:len(rows)])

  pending = None  # batch i's outputs are read once batch i+1 is dispatched, so the host never idles the device
  for rows in batching.eval_batches(len(data), cfg.train.eval_batch_size):
    rows = order[rows]
    batch = device_batch(task, data, rows, cfg.train.eval_batch_size, cfg, batch_sharding)
    out = eval_step(params, batch)
    if pending is not None:
      collect(*pending)
    pending = rows, out
  if pending is not None:
    collect(*pending)
  in_order = {} if outputs is None else outputs
  for key, values in parts.items():
    width = max(v.shape[1] for v in values) if values[0].ndim > 1 else None
    values = np.concatenate([v if width is None else np.pad(v, [(0, 0), (0, width - v.shape[1])]) for v in values])
    in_order[key] = np.empty_like(values)
    in_order[key][order] = values
  return task.metrics(in_order, data, labels, cfg)


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
  state: TrainState
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
  steps = run_steps(cfg, train_feed.per_epoch)
  hf_config, reader = checkpoint
  model = pretrained.from_config(hf_config, cfg.model, len(labels or ()), mesh, cfg.train.seed, cfg.task,
                                 rules)
  check_fits_model(cfg, model, {**splits, "train": train_feed} if cfg.data.streaming else splits)
  tx = optim.make(cfg.optim, steps)
  shardings = state_shardings(model, tx)
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels, "config": config_lib.to_dict(cfg), "steps_per_epoch": train_feed.per_epoch,
          "mesh": dict(mesh.shape)}
  if resume:  # straight into the saved state: of the pretrained weights only frozen params are read
    ckpts = Checkpoints(run_dir, cfg.checkpoint)
    state, saved_meta = _restore(ckpts, abstract_state(model, tx, shardings), model.frozen,
                                 lambda: pretrained.load_params(model, cfg.model, reader, cfg.train.seed, model.frozen))
    runs.check_resumable(saved_meta, int(state.step), train_feed, steps)
    runs.write_config(cfg, run_dir)  # the allowed changes (mesh, eval cadence, --extend) are now the run's
  else:
    params = pretrained.load_params(model, cfg.model, reader, cfg.train.seed)
    state = init_state(params, tx, cfg.train.seed, shardings, model.frozen)
    ckpts = runs.start_run(cfg, run_dir, tokenizer, lock, created)  # the first write, once everything checked out
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  train_step = make_train_step(model, task, tx, optim.schedule(cfg.optim, steps), dtype, shardings, batch_sharding,
                               cfg.train.grad_accum, cfg.model.remat, cfg.train.nonfinite == "skip")
  return Run(cfg, run_dir, ckpts, lock, model, task, labels, splits, train_feed, steps, state, train_step,
             make_eval_step(model, task, dtype, shardings.params, batch_sharding), batch_sharding, meta)


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
      record = summary.build(cfg, run_dir, report, param_counts(run.model, state), run.meta["mesh"],
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
         quiet: bool = False) -> tuple[TrainState, dict[str, Any], tuple[int, float]]:
  """Trains `run` to its last step: (final state, last validation metrics, (real tokens, FLOPs) trained on)."""
  cfg, state, step = run.cfg, run.state, int(run.state.step)
  clock = clock or perf.RunClock()
  log = metrics_lib.RunLog(run.dir, run.steps, step, cfg.train.tensorboard,  # on resume, drops later records
                           metrics_lib.start_wandb(cfg.train.wandb_project, run.dir, run.meta["config"]), quiet)
  sizes = param_counts(run.model, state)
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
        batch = device_batch(run.task, data, rows, cfg.train.batch_size, cfg, run.batch_sharding)
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
          last_eval = evaluate(run.eval_step, state.params, run.splits["validation"], cfg, run.batch_sharding,
                               run.task, run.labels)
        log.eval(step, "validation", last_eval)
      if save_now:
        with clock.phase("checkpoint"):
          run.ckpts.save(step, trainable(state.params, run.model.frozen), state.opt_state,
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


def _restore(ckpts: Checkpoints, target: TrainState, frozen: frozenset[str],
             load_frozen: Any) -> tuple[TrainState, dict[str, Any]]:
  """(state, meta) of the newest readable checkpoint, read into `target`'s shardings; unreadable ones set aside.

  Checkpoints hold the trainable params only; `load_frozen()` gives the rest (flat), from the base model.
  """
  items = {"params": trainable(target.params, frozen), "opt_state": target.opt_state,
           "train": {"step": target.step, "rng": target.rng}}
  _, meta, got = ckpts.restore_latest(lambda meta: items, set_aside=True)
  every = sharding.unflatten({**sharding.flatten(got["params"]), **(load_frozen() if frozen else {})})
  return TrainState(got["train"]["step"], every, got["opt_state"], got["train"]["rng"]), meta
