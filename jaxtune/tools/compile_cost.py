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
from typing import Any

from jaxtune.tools import probes
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
    for name in list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]:
      flags = f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name][0]}".strip()
      runs.append({"variant": name, "round": r,
                   **probes._child(["compile-cost-child", name, str(length)], env={"XLA_FLAGS": flags})})
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
  """In this fresh process (probes' compile-cost-child): the variant's step compiled, then 2 untimed and 8 timed
  steps."""
  import optax

  from jaxtune.tools import bench

  _, scan, optimiser = VARIANTS[name]
  spec = bench.Spec("minilm", 32, length, "float32", 0.1, scan_layers=scan)
  run, facts = bench._jax_side(spec, tx=optax.sgd(1e-4) if optimiser == "sgd" else None)
  return {"compile_s": facts["compile_s"], "step_s": statistics.median(bench._timed_steps(run, 10)[2:])}
