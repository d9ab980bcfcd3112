"""The scale-out options measured on a random Llama with scanned layers (scripts/benchmark.py scale): compile time
and program size against depth, XLA temp memory and step time per model.remat policy, and 1 vs 4 microbatches of
one global batch."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import sharding
from jaxtune.config import MeshConfig, OptimConfig
from jaxtune.models.llama import LlamaConfig
from jaxtune.models.model import describe, init_params
from jaxtune.tasks import TASKS
from jaxtune.train import optim, steps

VOCAB = 4096
REMAT = ("none", "full", "dots", "dots_no_batch")


def _setup(hidden: int, layers: int, mesh: jax.sharding.Mesh, **step_kwargs: Any) -> tuple[steps.TrainState, Any]:
  """(initial state, jitted train step) of a random Llama `layers` deep and `hidden` wide."""
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                    num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
                    scan_layers=True)
  model = describe("llama", cfg, mesh)
  opt = OptimConfig(lr=1e-4, schedule="constant")
  tx = optim.make(opt, 100)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, init_params(model, 0), tx, 0, shardings)
  step = steps.make_train_step(model, TASKS["causal_lm"], tx, optim.schedule(opt, 100), jnp.float32, shardings,
                               sharding.batch_sharding(mesh), **step_kwargs)
  return state, step


def _measure(state: steps.TrainState, step: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
  """Compile time, mean time of 3 steps after a warm-up, XLA temp memory and HLO lines of one compiled step."""
  tick = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - tick
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  tick = time.perf_counter()
  for _ in range(3):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  memory = compiled.memory_analysis()
  return {"compile_s": round(compile_s, 2), "step_s": round((time.perf_counter() - tick) / 3, 3),
          "temp_MiB": round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
          "ops": compiled.as_text().count("\n")}


def measure_all(hidden: int, layers: int, batch_size: int, length: int) -> dict[str, Any]:
  """The three tables (depth, remat, grad_accum) for batches of `batch_size` x `length` random tokens."""
  mesh = sharding.make_mesh(MeshConfig())
  rng = np.random.default_rng(0)
  shape = (batch_size, length)
  batch = {"input_ids": rng.integers(0, VOCAB, shape).astype(np.int32),
           "targets": rng.integers(0, VOCAB, shape).astype(np.int32), "segment_ids": np.ones(shape, np.int32),
           "positions": np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
           "loss_mask": np.ones(shape, np.float32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  run = lambda n, **kwargs: _measure(*_setup(hidden, n, mesh, **kwargs), batch)
  tables = {
      "depth": {f"{n} layers": run(n) for n in (2, 8, 32)},
      "remat": {policy: run(layers, remat=policy) for policy in REMAT},
      "grad_accum": {f"{k} x {batch_size // k} rows": run(layers, grad_accum=k) for k in (1, 4)},
  }
  devices = sharding.device_facts(mesh)
  return {"title": f"random Llama, hidden {hidden}, batch {batch_size} x {length} tokens, {devices['count']} "
                   f"{devices['kind']} ({devices['platform']}) device(s)", "tables": tables}


def table(result: dict[str, Any]) -> str:
  """`measure_all`'s result as aligned text, one block per table."""
  lines = [result["title"]]
  for name, rows in result["tables"].items():
    lines.append(f"\n{name:<16} | compile s | step s | XLA temp MiB | HLO lines")
    for label, r in rows.items():
      lines.append(f"{label:<16} | {r['compile_s']:>9} | {r['step_s']:>6} | {r['temp_MiB']!s:>12} | {r['ops']:>9}")
  return "\n".join(lines)
