"""The jitted train/eval steps and the fine-tuning loop (eval, logging, checkpoints, resume)."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.experimental import multihost_utils

from jaxtune import config as config_lib
from jaxtune import metrics as metrics_lib
from jaxtune import optim, perf, pretrained, sharding
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


def state_shardings(model: pretrained.Model, tx: optax.GradientTransformation) -> TrainState:
  """Where each leaf of the train state lives: params per the rules, moments like their param."""
  replicated = sharding.replicated(model.mesh)
  abstract_opt = jax.eval_shape(tx.init, sharding.unflatten(model.abstract))
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, model.shardings,
                              transform_non_params=lambda _: replicated)
  return TrainState(replicated, model.shardings, opt, replicated)


def initial_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0 of training from `params`: fresh optimiser state, the run's base dropout key."""
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(jax.random.key(seed)))


def abstract_state(model: pretrained.Model, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """The train state's shapes, dtypes and shardings, allocating nothing (a restore target)."""
  state = jax.eval_shape(lambda p: initial_state(p, tx, 0), sharding.unflatten(model.abstract))
  return sharding.placed(state, shardings)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
  """`initial_state` around `params` (donated), its optimiser state created directly in its shardings."""
  return jax.jit(lambda p: initial_state(p, tx, seed), out_shardings=shardings, donate_argnums=0)(params)


def make_train_step(model: pretrained.Model, task: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, dtype: jnp.dtype, shardings: TrainState, batch_sharding: Any,
                    grad_accum: int = 1, remat: str = "none"):
  """(state, batch) -> (state, metrics): one AdamW update, jitted once per batch shape, state donated.

  With grad_accum = K the batch runs as K microbatches in a scan; the summed loss and gradients
  are divided once by the target count of the whole batch, so the update equals the big batch's.
  """

  def summed(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(loss summed over the batch's targets, their count, gradient of the sum)."""
    def total(p: Any) -> tuple[jax.Array, jax.Array]:
      logits = model.apply(p, batch, dtype=dtype, dropout_rng=rng, remat=remat)["logits"]
      return task.loss_terms(logits, batch)

    (loss_sum, count), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss_sum, count, grads

  def accumulated(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    def body(acc: Any, xs: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[Any, None]:
      i, micro = xs
      return jax.tree.map(jnp.add, acc, summed(params, micro, jax.random.fold_in(rng, i))), None

    zero_grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), shardings.params)
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zero_grads)
    return jax.lax.scan(body, zero, (jnp.arange(grad_accum), microbatches(batch, grad_accum, batch_sharding)))[0]

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss_sum, count, grads = (summed if grad_accum == 1 else accumulated)(state.params, batch, rng)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
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
             labels: Any) -> dict[str, float]:
  """The task's metrics over every row of `data` (a short last batch is padded, then dropped).

  Rows go through shortest first, so each batch pads to the bucket of rows of similar length (fewer pad
  tokens than in data order); outputs are put back in data order.
  """
  order = np.argsort(data.lengths, kind="stable")
  outputs: dict[str, list[np.ndarray]] = {}

  def collect(rows: np.ndarray, out: dict[str, jax.Array]) -> None:
    for key, value in jax.device_get(out).items():
      outputs.setdefault(key, []).append(value[:len(rows)])

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
  in_order = {}
  for key, parts in outputs.items():
    in_order[key] = np.empty_like(values := np.concatenate(parts))
    in_order[key][order] = values
  return task.metrics(in_order, data, labels)


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
  model: pretrained.Model
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


def prepare(cfg: Config, run_dir: Path, resume: bool = False, clock: perf.RunClock | None = None) -> Run:
  """Checks the config against devices and data, builds the state in its shardings (restored on --resume)."""
  clock = clock or perf.RunClock()
  with clock.phase("setup"):
    perf.use_compile_cache(cfg.train.compile_cache)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_with(cfg.mesh.rules)
    check_devices(cfg, mesh, rules)
    _check_run_dir(cfg, run_dir, resume)
  with clock.phase("data"):
    tokenizer = pretrained.load_tokenizer(cfg.model)
    names = ["train"] + (["validation"] if cfg.data.validation or cfg.data.validation_holdout else [])
    labels, splits = TASKS[cfg.task].load(cfg, tokenizer, names)
  with clock.phase("weights"):
    return _build(cfg, run_dir, resume, mesh, rules, tokenizer, labels, splits)


def _build(cfg: Config, run_dir: Path, resume: bool, mesh: jax.sharding.Mesh, rules: sharding.Rules, tokenizer: Any,
           labels: Any, splits: dict[str, Any]) -> Run:
  """The rest of `prepare`, once the data is loaded: model, state (loaded or restored) and the jitted steps."""
  task = TASKS[cfg.task]
  per_epoch, steps = total_steps(cfg, len(splits["train"]))
  hf_config, reader = pretrained.open_checkpoint(cfg.model)  # opened once: parsing a GGUF file takes seconds
  model = pretrained.from_config(hf_config, cfg.model, len(labels or ()), mesh, cfg.train.seed, task.family_kind,
                                 rules)
  tx = optim.make(cfg.optim, steps)
  shardings = state_shardings(model, tx)
  ckpts = _start_run(cfg, run_dir, tokenizer)  # the first write, once everything above checked out
  if resume and ckpts.steps():  # straight into the saved state: the pretrained weights are never read
    state = _restore(ckpts, abstract_state(model, tx, shardings))
  else:
    params = pretrained.load_params(model, cfg.model, reader, cfg.train.seed)
    state = init_state(params, tx, cfg.train.seed, shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dtype = jnp.dtype(cfg.model.compute_dtype)
  meta = {"family": model.family, "model": dataclasses.asdict(model.cfg), "hf_config": model.hf_config,
          "labels": labels,
          "config": config_lib.to_dict(cfg), "steps_per_epoch": per_epoch, "mesh": dict(mesh.shape)}
  train_step = make_train_step(model, task, tx, optim.schedule(cfg.optim, steps), dtype, shardings, batch_sharding,
                               cfg.train.grad_accum, cfg.model.remat)
  return Run(cfg, run_dir, ckpts, model, task, labels, splits, per_epoch, steps, state, train_step,
             make_eval_step(model, task, dtype, shardings.params, batch_sharding), batch_sharding, meta)


def fit(cfg: Config, run_dir: Path, resume: bool = False, clock: perf.RunClock | None = None) -> dict[str, Any]:
  """Fine-tunes per `cfg`, writing logs, checkpoints and timing.json into run_dir; returns the last eval metrics."""
  clock = clock or perf.RunClock()
  run = prepare(cfg, run_dir, resume, clock)
  try:
    _, last_eval, work = loop(run, clock)
  finally:  # even when interrupted, let finished checkpoint writes commit
    with clock.phase("checkpoint"):
      run.ckpts.wait()
      run.ckpts.close()
  report = clock.report(*work)
  if jax.process_index() == 0:
    print(perf.write_report(report, run_dir / "timing.json"), flush=True)
  return last_eval


def loop(run: Run, clock: perf.RunClock | None = None) -> tuple[TrainState, dict[str, Any], tuple[int, float]]:
  """Trains `run` to its last step: (final state, last validation metrics, (real tokens, FLOPs) trained on)."""
  cfg, state, step = run.cfg, run.state, int(run.state.step)
  clock = clock or perf.RunClock()
  log = metrics_lib.RunLog(run.dir, run.steps, step)
  log.write({"step": step, "event": "start", "total_steps": run.steps, "mesh": run.meta["mesh"],
             "processes": jax.process_count()})
  last_eval: dict[str, Any] = {}
  lengths = run.splits["train"].lengths  # real tokens per row
  flops_per_token = functools.cache(lambda length: perf.train_flops_per_token(run.model.hf_config, length, cfg.task))
  tick, seen, work = time.perf_counter(), {"examples": 0, "tokens": 0}, [0, 0.0]
  save_every = cfg.checkpoint.save_every or cfg.train.eval_every
  pending = None  # (step, metrics) to log: read once the next step is dispatched, so logging never stalls the device
  for rows in batching.step_batches(lengths, cfg.train.batch_size, cfg.train.seed, cfg.data.group_by_length,
                                    run.per_epoch, step, run.steps):
    with clock.phase("train"):
      batch = device_batch(run.task, run.splits["train"], rows, cfg.train.batch_size, cfg, run.batch_sharding)
      state, step_metrics = run.train_step(state, batch)
      clock.mark_first_step()
      step += 1
      tokens = int(lengths[rows].sum())
      seen["examples"] += len(rows)
      seen["tokens"] += tokens
      length = batch["input_ids"].shape[1]
      work[0] += tokens
      work[1] += cfg.train.batch_size * length * flops_per_token(length)
      if pending is not None:
        _log_train(log, run, *pending)
        pending = None
      log.advance()
      evaluate_now = "validation" in run.splits and (
          step == run.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
      save_now = step == run.steps or (save_every and step % save_every == 0)
      if step % cfg.train.log_every == 0 or step == run.steps:
        pending = step, step_metrics, seen, tick
        if evaluate_now or save_now:  # the state is about to be read anyway (save_now holds at the last step)
          _log_train(log, run, *pending)
          pending = None
    if evaluate_now:
      with clock.phase("eval"):
        last_eval = evaluate(run.eval_step, state.params, run.splits["validation"], cfg, run.batch_sharding,
                             run.task, run.labels)
      log.eval(step, "validation", last_eval)
    if save_now:
      with clock.phase("checkpoint"):
        position = {"epoch": step // run.per_epoch, "batch_in_epoch": step % run.per_epoch}
        run.ckpts.save(step, state.params, state.opt_state, {"step": state.step, "rng": state.rng},
                       {**run.meta, "data_position": position}, last_eval if evaluate_now else None)
    if evaluate_now or step % cfg.train.log_every == 0:  # throughput counts training time only
      tick, seen = time.perf_counter(), {"examples": 0, "tokens": 0}
  log.close()
  return state, last_eval, tuple(work)


def _log_train(log: metrics_lib.RunLog, run: Run, step: int, step_metrics: dict[str, jax.Array],
               seen: dict[str, int], tick: float) -> None:
  """Writes one train log record; waits for step `step` to finish (its metrics), not for any later one."""
  record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  elapsed = time.perf_counter() - tick
  record.update(epoch=step / run.per_epoch, examples_per_s=seen["examples"] / elapsed,
                tokens_per_s=seen["tokens"] / elapsed)
  log.train(step, record)


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
  """Refuses to mix a new run into an old one's directory, or to resume with a different config."""
  config_path = run_dir / "config.yaml"
  if config_path.exists() and not resume:
    raise UserError(f"run dir {run_dir} already holds a run; pass --resume to continue it or choose a "
                    "new --run-dir (nothing there was changed).")
  if resume and config_path.exists():
    saved = config_lib.load(config_path)
    # The mesh may change (a restore reshards onto any layout), and the train section (e.g. more steps).
    if dataclasses.replace(saved, train=cfg.train, mesh=cfg.mesh) != cfg:
      raise UserError(f"--resume: the config differs from {config_path} outside the train and mesh sections; "
                      "resume with the saved config (or start a new --run-dir).")
  _barrier("run dir checked")  # every process has looked before process 0 writes anything


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
  _barrier("run dir written")
  return Checkpoints(run_dir, cfg.checkpoint)


def _barrier(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxtune: {name}")


def _restore(ckpts: Checkpoints, target: TrainState) -> TrainState:
  """The latest checkpoint's params, optimiser and train state, read into `target`'s shardings."""
  got = ckpts.restore(ckpts.resolve("latest"), params=target.params, opt_state=target.opt_state,
                      train={"step": target.step, "rng": target.rng})
  return TrainState(got["train"]["step"], got["params"], got["opt_state"], got["train"]["rng"])
