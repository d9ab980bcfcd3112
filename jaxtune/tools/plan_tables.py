"""The planner's tables for large models (scripts/plan_tables.py, docs/large_models.md): Llama-3.1-8B and -70B by
full fine-tuning, LoRA on a bfloat16 base and QLoRA on an NF4 base, on 1 and 8 H200s, a v5e-8 and a v5p-64.

Every cell is one `jaxtune plan` (tools/plan.py) of configs/llama3_8b_pod.yaml at torchtune's published workload:
2 packed rows of 2048 tokens per device, activation checkpointing (model.remat full), bfloat16 compute, params
sharded over every device (fsdp); LoRA rank 8 on all seven projections. TPU cells compile the real train step for
the slice; GPU cells are the analytic estimate (no deviceless GPU compile exists). `max_context` finds the longest
single row that the estimate fits in a given HBM, as Unsloth publishes for QLoRA.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxtune import config as config_lib
from jaxtune.tools import plan
from jaxtune.train import estimate

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "llama3_8b_pod.yaml"
MODELS = {"Llama-3.1-8B": ("meta-llama/Llama-3.1-8B-Instruct", REPO / "configs" / "hf" / "llama-3.1-8b.json"),
          "Llama-3.1-70B": ("meta-llama/Llama-3.1-70B-Instruct", REPO / "configs" / "hf" / "llama-3.1-70b.json")}
LORA = ["model.lora.targets=['layers[.]attn[.](q|k|v|o)[.]kernel','layers[.]mlp[.](gate|up|down)[.]kernel']",
        "model.lora.rank=8", "model.lora.alpha=16"]
METHODS = {"full": [], "LoRA bf16": [*LORA, "model.frozen_dtype=bfloat16"],
           "QLoRA NF4": [*LORA, "model.frozen_dtype=nf4"]}
TARGETS = {"1 x H200": ("h200", 1), "8 x H200": ("h200", 8), "v5e-8": ("v5e:2x4", None), "v5p-64": ("v5p:4x4x4", None)}
ROWS, LENGTH = 2, 2048  # per device: torchtune's README table (batch 2, packed to 2048 tokens)


def target_of(name: str) -> plan.Target:
  where, count = TARGETS[name]
  return plan.gpu_target(where, count) if count else plan.tpu_target(where)


def overrides(model: str, method: str, devices: int, rows: int = ROWS, length: int = LENGTH) -> list[str]:
  return [f"model.path={MODELS[model][0]}", f"data.max_len={length}", "data.length_buckets=[]",
          f"train.batch_size={rows * devices}", "train.grad_accum=1", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
          "model.remat=full", "model.compute_dtype=bfloat16", "model.scan_layers=true", *METHODS[method]]


@dataclasses.dataclass(frozen=True)
class Cell:
  model: str
  method: str
  target: str
  result: dict[str, Any]


def run(models: Sequence[str], methods: Sequence[str], targets: Sequence[str],
        log: Callable[[str], None] = print) -> list[Cell]:
  cells = []
  for target_name in targets:
    target = target_of(target_name)
    for model in models:
      hf_config = json.loads(MODELS[model][1].read_text())
      for method in methods:
        cfg = config_lib.load(BASE, overrides(model, method, target.count))
        result = plan.plan(cfg, hf_config, target, config_name=f"{model} {method}")
        log(f"{model:<14} {method:<10} {target_name:<9} {result['memory_per_device_bytes']['total'] / 2**30:8.2f} "
            f"GiB per device: {result['verdict']}")
        cells.append(Cell(model, method, target_name, result))
  return cells


def markdown(cells: Sequence[Cell]) -> str:
  head = ("| model | method | target | params / trained | memory per device (GiB) | of HBM | source | "
          "roofline tokens/s (40% MFU) | verdict |\n|---|---|---|---|---|---|---|---|---|\n")
  rows = []
  for c in cells:
    r = c.result
    m = r["memory_per_device_bytes"]
    source = "compiled" if "compile_s" in r else "estimate"
    speed = f"{r['compute']['tokens_per_s']:,.0f}" if r["compute"]["tokens_per_s"] else "-"
    trained = f"{r['model']['params'] / 1e9:.2f} B / {r['model']['trainable_params'] / 1e6:,.1f} M"
    verdict = "fits" if r["fits"] else "does not fit" + (
        f"; fits with {' '.join(r['suggestion']['overrides'])}" if r["suggestion"] else "")
    rows.append(f"| {c.model} | {c.method} | {c.target} | {trained} | {m['total'] / 2**30:.2f} | "
                f"{100 * r['hbm_share']:.0f}% | {source} | {speed} | {verdict} |")
  return head + "\n".join(rows) + "\n"


def max_context(model: str, method: str, hbm_gib: float, lora_rank: int = 32, high: int = 1 << 21) -> int:
  """The longest single row (batch 1, one GPU) whose analytic estimate fits `hbm_gib` GiB: Unsloth's published
  measure for QLoRA (rank 32 on all seven projections, batch 1). The model is described once; the estimate is
  then bisected over the row length in multiples of 256 tokens, past the model's own position limit (as Unsloth
  does: its figures for Llama-3.1-8B pass the 131,072 positions it was trained for)."""
  hf_config = json.loads(MODELS[model][1].read_text())
  rank = [f"model.lora.rank={lora_rank}", f"model.lora.alpha={2 * lora_rank}"] if method != "full" else []
  config = lambda length: config_lib.load(BASE, [*overrides(model, method, 1, 1, length), *rank])
  described, mesh_shape = plan.analytic_build(hf_config, 1, 2)(config(LENGTH))
  fits = lambda length: estimate.estimate(config(length), described, mesh_shape)["total"] <= hbm_gib * 2**30
  low = 0
  while high - low > 256:
    mid = (low + high) // 2 // 256 * 256
    low, high = (mid, high) if fits(mid) else (low, mid)
  return low
