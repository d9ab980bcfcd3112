"""What a MiniLM train step costs to compile, and what the ways to compile it faster cost the step
(scripts/benchmark.py probe compile-cost; docs/performance.md).

Each variant runs in a fresh process (nothing compiled or cached before it, no persistent compile cache), the
variants' order alternating over the rounds: the train step of batch 32 x `length` (random MiniLM weights, dropout
0.1, AdamW with clipping, as bench.Spec builds it) compiled, then 2 untimed and 8 timed steps. Per variant: the
compile seconds and the median step seconds, each as median [min-max] over the rounds.

The variants (VARIANTS): the step as is; XLA's LLVM optimisation level 1 instead of 2; XLA:CPU's fast-compile preset;
the layers as one scan (model.scan_layers); and, to size the optimiser's share of the compile, plain SGD in place
of AdamW with clipping (not a candidate: a different optimiser).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from jaxtune.tools.spread import spread

# name -> (extra XLA_FLAGS, scan_layers, optimiser)
VARIANTS = {
    "as is": ("", False, "adamw"),
    "LLVM -O1": ("--xla_backend_optimization_level=1", False, "adamw"),
    "fast-compile preset": ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE", False, "adamw"),
    "scanned layers": ("", True, "adamw"),
    "SGD (optimiser's share)": ("", False, "sgd"),
}


def measure(rounds: int, length: int) -> dict[str, Any]:
  runs = []
  for r in range(rounds):
    names = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
    for name in names:
      flags, _, _ = VARIANTS[name]
      env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
             "JAX_COMPILATION_CACHE_DIR": ""}
      out = subprocess.run([sys.executable, "-m", "jaxtune.tools.compile_cost", name, str(length)], env=env,
                           capture_output=True, text=True)
      if out.returncode:
        raise RuntimeError(f"compile-cost {name!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
      runs.append({"variant": name, "round": r, **json.loads(out.stdout.strip().splitlines()[-1])})
      print(json.dumps(runs[-1]), flush=True)
  return {"length": length, "rounds": rounds,
          "variants": {name: {k: spread(x[k] for x in runs if x["variant"] == name) for k in ("compile_s", "step_s")}
                       for name in VARIANTS},
          "runs": runs}


def table(result: dict[str, Any]) -> str:
  fmt = lambda s, f: f"{s['median']:{f}} [{s['min']:{f}}-{s['max']:{f}}]"
  base = result["variants"]["as is"]
  lines = [f"MiniLM train step, batch 32 x {result['length']}, each variant a fresh process, median [min-max] of "
           f"{result['rounds']} alternated runs",
           "| variant | compile s | step s | compile vs as is | step vs as is |", "|---|---|---|---|---|"]
  for name, v in result["variants"].items():
    lines.append(f"| {name} | {fmt(v['compile_s'], '.2f')} | {fmt(v['step_s'], '.3f')} | "
                 f"{v['compile_s']['median'] - base['compile_s']['median']:+.2f} s | "
                 f"{100 * (v['step_s']['median'] / base['step_s']['median'] - 1):+.1f}% |")
  return "\n".join(lines)


def child(name: str, length: int) -> dict[str, float]:
  """In this fresh process: the variant's step compiled and timed."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxtune import sharding
  from jaxtune.config import MeshConfig, ModelConfig, OptimConfig
  from jaxtune.models.model import init_params
  from jaxtune.tasks import TASKS
  from jaxtune.tools import bench
  from jaxtune.train import optim, steps
  from jaxtune.weights import pretrained

  _, scan, optimiser = VARIANTS[name]
  spec = bench.Spec("minilm", 32, length, "float32", 0.1, scan_layers=scan)
  mesh = sharding.make_mesh(MeshConfig())
  model = pretrained.from_config(spec.hf, ModelConfig(path=spec.shape, scan_layers=scan), 2, mesh, spec.seed)
  opt = OptimConfig(lr=1e-4, schedule="constant")
  tx = optim.make(opt, 1000) if optimiser == "adamw" else optax.sgd(1e-4)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, init_params(model, spec.seed), tx, spec.seed, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, TASKS[spec.task], tx, optim.schedule(opt, 1000), jnp.float32, shardings,
                               batch_sharding)
  batch = jax.device_put(bench.batch_arrays(spec), batch_sharding)
  tick = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - tick
  times = []
  for i in range(10):
    tick = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - tick)
  return {"compile_s": compile_s, "step_s": statistics.median(times)}


if __name__ == "__main__":
  from jaxtune import cli

  cli.tune_host()  # as scripts/finetune.py: it appends its XLA flag to the variant's and may re-execute
  print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))
