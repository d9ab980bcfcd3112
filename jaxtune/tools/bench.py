"""Peer benchmark: jaxtune's train step against the transformers PyTorch class of the same shape, side by side.

Each side runs in its own worker process (so each has its own peak memory and neither one's allocator or
thread pool disturbs the other); the parent alternates their turns, A B B A, so that a noisy machine slows
both alike. A turn is `settle` untimed steps, then one timed step: the first step after the other side ran
is slower on a shared VM (on this 2-core machine jaxtune's MiniLM step took 5.5 s after a PyTorch step and
3.2 s after one of its own, as the memory it freed was handed back to the host in between), and a training
run never alternates. Weights are random: a step's time does not depend on their values.

Run it through scripts/benchmark.py peer; `python -m jaxtune.tools.bench worker SIDE SPEC` is the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from jaxtune.train import perf

# Named shapes: the HF config.json of each (random weights), the task, and defaults for batch x length and dropout.
_BERT = {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
         "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0}
_LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "max_position_embeddings": 8192, "attention_bias": False, "mlp_bias": False}
SHAPES: dict[str, dict[str, Any]] = {
    "minilm": {"hf": {**_BERT, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                      "intermediate_size": 1536}, "task": "classification", "batch": 32, "length": 128,
               "dropout": 0.1},
    "bert-base": {"hf": {**_BERT, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072}, "task": "classification", "batch": 32, "length": 128,
                  "dropout": 0.1},
    "smollm2-135m": {"hf": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                            "head_dim": 64, "rope_theta": 100000.0, "pad_token_id": 2},
                     "task": "causal_lm", "batch": 8, "length": 256, "dropout": 0.0},
    "llama-1b": {"hf": {**_LLAMA, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "head_dim": 64, "rope_theta": 500000.0, "pad_token_id": 128004},
                 "task": "causal_lm", "batch": 8, "length": 2048, "dropout": 0.0},
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What both sides run: one shape, batch, precision, dropout and optimiser."""
  shape: str
  batch: int
  length: int
  dtype: str = "float32"  # compute dtype; params and optimiser state stay float32 on both sides
  dropout: float = 0.0  # every dropout rate of the model, on both sides
  seed: int = 0
  scan_layers: bool = False  # jaxtune's model.scan_layers
  remat: str = "none"  # jaxtune's model.remat

  @property
  def hf(self) -> dict[str, Any]:
    """The HF config both sides build, with the spec's dropout in every rate."""
    hf = dict(SHAPES[self.shape]["hf"])
    keys = ("hidden_dropout_prob", "attention_probs_dropout_prob") if hf["model_type"] == "bert" else (
        "attention_dropout",)
    return {**hf, **dict.fromkeys(keys, self.dropout)}

  @property
  def task(self) -> str:
    return SHAPES[self.shape]["task"]


def batch_arrays(spec: Spec) -> dict[str, Any]:
  """Random token ids and full-length rows (no padding), as numpy arrays in jaxtune's batch layout."""
  import numpy as np

  rng = np.random.default_rng(spec.seed)
  shape = (spec.batch, spec.length)
  ids = rng.integers(0, spec.hf["vocab_size"], shape).astype(np.int32)
  if spec.task == "classification":
    return {"input_ids": ids, "attention_mask": np.ones(shape, np.int32), "token_type_ids": np.zeros(shape, np.int32),
            "labels": rng.integers(0, 2, spec.batch).astype(np.int32), "weights": np.ones(spec.batch, np.float32)}
  return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1), "segment_ids": np.ones(shape, np.int32),
          "positions": np.tile(np.arange(spec.length, dtype=np.int32), (spec.batch, 1)),
          "loss_mask": np.ones(shape, np.float32)}


def _jax_side(spec: Spec, compiler_options: dict[str, Any] | None = None,
              tx: Any = None) -> tuple[Any, dict[str, Any]]:
  """(one-step callable, facts) for jaxtune: the jitted train step of steps.make_train_step, state donated.

  `compiler_options`: XLA debug options for this compile only (e.g. {"xla_cpu_enable_fast_math": True}).
  `tx`: the optimiser (default jaxtune's AdamW with clipping, optim.make).
  """
  import jax
  import jax.numpy as jnp

  from jaxtune import sharding
  from jaxtune.config import MeshConfig, ModelConfig, OptimConfig
  from jaxtune.models.model import init_params
  from jaxtune.tasks import TASKS
  from jaxtune.train import optim, steps
  from jaxtune.weights import pretrained

  mesh = sharding.make_mesh(MeshConfig())
  num_labels = 2 if spec.task == "classification" else 0
  model_cfg = ModelConfig(path=spec.shape, scan_layers=spec.scan_layers)
  model = pretrained.from_config(spec.hf, model_cfg, num_labels, mesh, spec.seed)
  opt = OptimConfig(lr=1e-4, schedule="constant")
  tx = optim.make(opt, 1000) if tx is None else tx
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, init_params(model, spec.seed), tx, spec.seed, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, TASKS[spec.task], tx, optim.schedule(opt, 1000), jnp.dtype(spec.dtype),
                               shardings, batch_sharding, remat=spec.remat)
  batch = jax.device_put(batch_arrays(spec), batch_sharding)
  tick = time.perf_counter()
  compiled = step.lower(state, batch).compile(compiler_options=compiler_options or None)
  facts = {"compile_s": time.perf_counter() - tick, "threads": os.cpu_count(), "devices": mesh.devices.size,
           "device_kind": mesh.devices.flat[0].device_kind, "platform": mesh.devices.flat[0].platform}
  analysis = compiled.memory_analysis()  # XLA's buffer plan: the step's temporaries, beside params and batch
  facts["xla_temp_bytes"] = getattr(analysis, "temp_size_in_bytes", None)
  holder = [state]

  def run() -> None:
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  return run, facts


def _torch_side(spec: Spec) -> tuple[Any, dict[str, Any]]:
  """(one-step callable, facts) for transformers: forward, backward, clip, fused AdamW, as HF Trainer steps."""
  import torch
  import transformers

  from jaxtune.config import OptimConfig
  from jaxtune.tools import torch_ref
  from jaxtune.weights import export

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)
  hf = {k: v for k, v in spec.hf.items() if k != "model_type"}
  config = transformers.AutoConfig.for_model(spec.hf["model_type"], **hf, num_labels=2)
  torch.manual_seed(spec.seed)
  module = getattr(transformers, export.architecture(spec.hf["model_type"]))(config).float().to(device).train()
  opt, sched = torch_ref.optimizer(module, OptimConfig(lr=1e-4, schedule="constant"), 1000)
  arrays = batch_arrays(spec)
  ids = torch.from_numpy(arrays["input_ids"]).long().to(device)
  if spec.task == "classification":
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": torch.from_numpy(arrays["labels"]).long().to(device)}
  else:
    inputs = {"input_ids": ids, "labels": ids}  # HF shifts the labels itself
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")

  def run() -> None:
    with autocast:
      loss = module(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  facts = {"compile_s": 0.0, "threads": torch.get_num_threads(), "devices": 1, "platform": device,
           "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
  return run, facts


def _device_peak_bytes(side: str) -> int | None:
  """Peak accelerator memory of this worker, where the backend reports it (None on CPU)."""
  if side == "jax":
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
  import torch

  return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _timed_steps(run: Callable[[], None], n: int) -> list[float]:
  """Seconds of each of `n` calls of `run`, one after the other."""
  times = []
  for _ in range(n):
    tick = time.perf_counter()
    run()
    times.append(time.perf_counter() - tick)
  return times


def _alternate(names: list[str], reps: int, turn: Callable[[str], list[float]]) -> tuple[dict, dict]:
  """`reps` turns per name in the order A B B A ..., `turn(name)` giving a turn's step times (untimed settle
  steps, then the timed one): ({name: timed steps}, {name: settle steps})."""
  times: dict[str, list[float]] = {name: [] for name in names}
  settling: dict[str, list[float]] = {name: [] for name in names}
  for rep in range(reps):
    for name in names if rep % 2 == 0 else names[::-1]:
      *first, timed = turn(name)
      times[name].append(timed)
      settling[name] += first
  return times, settling


def worker(side: str, spec: Spec) -> None:
  """Builds one side, then answers the parent's commands on stdin, one JSON line each."""
  base_rss = perf.peak_rss_bytes()
  run, facts = (_jax_side if side == "jax" else _torch_side)(spec)
  tick = time.perf_counter()
  run()  # the first step: warm-up (allocations, autotuning), reported apart
  facts.update(first_step_s=time.perf_counter() - tick, rss_before_build=base_rss)
  print(json.dumps(facts), flush=True)
  for command in sys.stdin:
    command = command.strip()
    if command.startswith("steps "):
      out: dict[str, Any] = {"step_s": _timed_steps(run, int(command.split()[1]))}
    elif command == "peak":
      out = {"peak_flops": perf.matmul_peak(side, spec.dtype)}
    elif command == "memory":
      out = {"peak_rss": perf.peak_rss_bytes(), "device_peak": _device_peak_bytes(side)}
    else:
      return
    print(json.dumps(out), flush=True)


class _Worker:
  """One side's worker process, spoken to a line at a time."""

  def __init__(self, side: str, spec: Spec):
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # share one GPU with the torch side
    self.proc = subprocess.Popen([sys.executable, "-m", "jaxtune.tools.bench", "worker", side,
                                  json.dumps(dataclasses.asdict(spec))], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
    self.facts = self._read()

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker {self.proc.args[4]} exited with {self.proc.wait()}; see its stderr.")
    return json.loads(line)

  def ask(self, command: str) -> dict[str, Any]:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def peer(spec: Spec, reps: int, settle: int = 1) -> dict[str, Any]:
  """Both sides' step times (A B B A over `reps` turns each), compile, memory, tokens/s and MFU, in one dict."""
  sides = {"jaxtune": _Worker("jax", spec)}
  sides["pytorch"] = _Worker("torch", spec)  # started after jaxtune compiled, so neither slows the other's build
  try:
    times, settling = _alternate(list(sides), reps, lambda name: sides[name].ask(f"steps {settle + 1}")["step_s"])
    peaks = {name: w.ask("peak")["peak_flops"] for name, w in sides.items()}
    memory = {name: w.ask("memory") for name, w in sides.items()}
  finally:
    for w in sides.values():
      w.close()
  facts = sides["jaxtune"].facts
  peak = perf.vendor_peak_flops(facts["device_kind"]) if facts["platform"] != "cpu" else max(peaks.values())
  tokens = spec.batch * spec.length
  flops_per_token = perf.train_flops_per_token(spec.hf, spec.length, spec.task)
  result: dict[str, Any] = {"spec": dataclasses.asdict(spec), "hf": spec.hf, "reps": reps, "settle": settle,
                            "flops_per_token": flops_per_token, "peak_flops": peak,
                            "peak_source": "vendor table" if facts["platform"] != "cpu" else "measured matmul",
                            "matmul_flops": peaks, "sides": {}}
  for name, w in sides.items():
    step_s = statistics.median(times[name])
    result["sides"][name] = {
        "step_s": step_s, "step_s_all": times[name], "settle_s_all": settling[name], "tokens_per_s": tokens / step_s,
        "mfu": flops_per_token * tokens / step_s / peak if peak else None, **w.facts, **memory[name]}
  result["speedup"] = result["sides"]["pytorch"]["step_s"] / result["sides"]["jaxtune"]["step_s"]
  return result


def options_ab(spec: Spec, options: dict[str, Any], reps: int, settle: int = 1,
               env: dict[str, str] | None = None) -> dict[str, Any]:
  """jaxtune's step compiled twice in this process, as is (A) and with XLA `options` (B) and environment `env` set
  while B is traced (e.g. JAXTUNE_CPU_ATTENTION=0: XLA's attention instead of jaxtune's kernel); turns alternate
  A B B A (each `settle` untimed steps, then a timed one): both medians and A / B (> 1: B is faster)."""
  runs, facts = {}, {}
  for name, opts, variables in (("A", None, {}), ("B", options, env or {})):
    with _environ(variables):
      runs[name], facts[name] = _jax_side(spec, opts)
    runs[name]()  # warm-up
  times, _ = _alternate(["A", "B"], reps, lambda name: _timed_steps(runs[name], settle + 1))
  medians = {name: statistics.median(t) for name, t in times.items()}
  return {"spec": dataclasses.asdict(spec), "options": options, "env": env or {}, "reps": reps, "settle": settle,
          "step_s": medians, "step_s_all": times, "compile_s": {n: f["compile_s"] for n, f in facts.items()},
          "xla_temp_bytes": {n: f["xla_temp_bytes"] for n, f in facts.items()}, "speedup": medians["A"] / medians["B"]}


@contextlib.contextmanager
def _environ(variables: dict[str, str]) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in variables}
  os.environ.update({k: str(v) for k, v in variables.items()})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k)
      else:
        os.environ[k] = v


def options_table(result: dict[str, Any]) -> str:
  """The options A/B result as text."""
  s = result["spec"]
  lines = [f"{s['shape']}: batch {s['batch']} x {s['length']}, {s['dtype']}, dropout {s['dropout']}, "
           f"remat {s['remat']}; "
           f"{result['reps']} alternating turns of {result['settle']} untimed + 1 timed step; "
           f"B: options {result['options']}, environment {result['env']}"]
  for name in ("A", "B"):
    steps = " ".join(f"{t:.2f}" for t in result["step_s_all"][name])
    lines.append(f"{name}: step {result['step_s'][name]:.3f} s (median; all: {steps}), compile "
                 f"{result['compile_s'][name]:.1f} s, XLA temp {(result['xla_temp_bytes'][name] or 0) / 1e9:.2f} GB")
  lines.append(f"A / B: {result['speedup']:.3f}x (above 1: B makes the step faster)")
  return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
  """The peer result as a text table."""
  s = result["spec"]
  lines = [f"{s['shape']}: batch {s['batch']} x {s['length']}, {s['dtype']}, dropout {s['dropout']}, "
           f"remat {s['remat']}, "
           f"{result['reps']} alternating turns of {result['settle']} untimed + 1 timed step per side; "
           f"peak {result['peak_flops'] / 1e9:.0f} GFLOP/s ({result['peak_source']}), "
           f"{result['flops_per_token'] / 1e6:.1f} MFLOP per token",
           f"{'side':<8} | step s (median) | all steps s | tokens/s | compile s | first step s | threads | "
           f"peak RSS GB | device peak GB | MFU"]
  for name, r in result["sides"].items():
    device = f"{r['device_peak'] / 1e9:.2f}" if r["device_peak"] else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    lines.append(f"{name:<8} | {r['step_s']:>15.3f} | {' '.join(f'{t:.2f}' for t in r['step_s_all'])} | "
                 f"{r['tokens_per_s']:>8.0f} | {r['compile_s']:>9.1f} | {r['first_step_s']:>12.2f} | "
                 f"{r['threads']:>7} | {r['peak_rss'] / 1e9:>11.2f} | {device:>14} | {mfu}")
  for name, r in result["sides"].items():
    lines.append(f"{name} untimed first steps of its turns, s: {' '.join(f'{t:.2f}' for t in r['settle_s_all'])}")
  temp = result["sides"]["jaxtune"].get("xla_temp_bytes")
  if temp:
    lines.append(f"jaxtune's XLA temporary buffer for the step: {temp / 1e9:.2f} GB")
  lines.append(f"jaxtune speed / PyTorch speed: {result['speedup']:.2f}x")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 4 or sys.argv[1] != "worker":
    sys.exit("usage: python -m jaxtune.bench worker jax|torch SPEC_JSON (started by scripts/benchmark.py peer)")
  worker(sys.argv[2], Spec(**json.loads(sys.argv[3])))
