"""One-shot accelerator benchmark (scripts/gpu_bench.sh): jaxtune's own train step on a ~1B Llama and on BERT-base,
written to one JSON file, within a time budget, so that a single short GPU lease answers the performance questions.

What it measures (docs/gpu.md): the 1B Llama (Llama-3.2-1B's shape, random weights) at 2048 tokens, bf16 compute
over float32 master weights, full fine-tune and LoRA under each model.remat policy; BERT-base classification at 512
tokens; cuDNN's fused attention against XLA's attention ops on both models. Each case is one worker process
(`python -m jaxtune.tools.gpu_bench worker CASE`): its peak device memory is its own (jax has no way to reset the
peak of a process), an out-of-memory case dies alone and is recorded as "oom", and a case that would run past the
budget is killed. The JSON is rewritten after every case, so an interrupted run still leaves what it measured.

FLOPs come from the shape (train/perf.py: 6 x matmul params per token + attention, PaLM's convention, causal
masking not discounted), never from XLA's cost analysis. LoRA: the frozen base runs its forward matmuls (2 x N) and
the activation gradients through them (2 x N) but no weight gradients, the adapters all three (6 x adapter params),
attention as in full fine-tuning: 4 N + 6 N_adapter + attention per token. MFU divides by the datasheet dense bf16
peak of the device kind (train/perf.py's table); a kind not in it (a CPU) gets no MFU, and a note says why.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jaxtune.tools import bench
from jaxtune.train import perf

SCHEMA = "jaxtune.gpu_bench/1"
REMAT = ("none", "full", "dots", "dots_no_batch")
TARGET_MFU = 0.45  # issue 29: the 1B full fine-tune on an H200
LORA_TARGETS = (r"layers\.attn\.(q|k|v|o)\.kernel", r"layers\.mlp\.(gate|up|down)\.kernel")  # the Llama's 7 matmuls
LORA_RANK = 16
MARK = "GPU_BENCH_RESULT "  # the worker's result line on stdout, apart from anything a library prints

_TINY_LLAMA = {**bench.SHAPES["llama-1b"]["hf"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "pad_token_id": 0}
_TINY_BERT = {**bench.SHAPES["bert-base"]["hf"], "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64}
# shape -> model -> (HF config, task, batch, length, warm-up steps, timed steps). Full: the 1B's batch of 8 x 2048
# (16k tokens a step) should keep an H100/H200 busy and fit 141 GiB even without remat; BERT's 32 x 512 likewise.
SHAPES: dict[str, dict[str, tuple[dict[str, Any], str, int, int, int, int]]] = {
    "full": {"llama-1b": (bench.SHAPES["llama-1b"]["hf"], "causal_lm", 8, 2048, 3, 10),
             "bert-base": (bench.SHAPES["bert-base"]["hf"], "classification", 32, 512, 3, 20)},
    "tiny": {"llama-1b": (_TINY_LLAMA, "causal_lm", 2, 64, 1, 2),
             "bert-base": (_TINY_BERT, "classification", 2, 64, 1, 2)},
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: a model at its batch x length, one remat policy, attention kernel and full FT or LoRA.

  It has the fields bench.batch_arrays reads (hf, task, batch, length, seed), so the batch is the peer
  benchmark's: random token ids in the task's collate layout, no padding."""
  name: str
  section: str  # "remat" (full fine-tune), "lora", "attention"
  model: str  # key of SHAPES[shape]
  hf: dict[str, Any]
  task: str
  batch: int
  length: int
  warmup: int
  steps: int
  remat: str = "none"  # model.remat; "best": the fastest full fine-tune policy measured before it
  attention: str = "auto"  # model.attention
  lora: bool = False
  seed: int = 0


def plan(shape: str, warmup: int | None = None, steps: int | None = None) -> list[Case]:
  """Every case, most wanted first, so a budget that runs out drops the least wanted: the 1B full fine-tune per
  remat policy (the MFU target), the attention kernels side by side (BERT, then the 1B at its fastest policy), then
  LoRA per policy."""
  def case(name: str, section: str, model: str, **kw: Any) -> Case:
    hf, task, batch, length, w, n = SHAPES[shape][model]
    return Case(name, section, model, hf, task, batch, length, w if warmup is None else warmup,
                n if steps is None else steps, **kw)

  cases = [case(f"llama-1b full-ft remat={r}", "remat", "llama-1b", remat=r) for r in REMAT]
  cases += [case(f"bert-base attention={a}", "attention", "bert-base", attention=a) for a in ("cudnn", "xla")]
  cases += [case(f"llama-1b attention={a}", "attention", "llama-1b", remat="best", attention=a)
            for a in ("cudnn", "xla")]
  return cases + [case(f"llama-1b lora remat={r}", "lora", "llama-1b", remat=r, lora=True) for r in REMAT]


def flops_per_token(case: Case, adapter_params: int) -> float:
  """Training FLOPs per token from the shape (module docstring): full fine-tune 6 N + attention; LoRA
  4 N + 6 N_adapter + attention."""
  n = perf.matmul_params_per_token(case.hf, case.task)
  attention = perf.train_flops_per_token(case.hf, case.length, case.task) - 6.0 * n
  return (4.0 * n + 6.0 * adapter_params if case.lora else 6.0 * n) + attention


def _is_oom(text: str) -> bool:
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure(case: Case) -> dict[str, Any]:
  """Builds the case's model (random weights) and train step as training does, compiles it, runs `warmup` steps,
  then times `steps` steps dispatched back to back (one block_until_ready at the end)."""
  import jax
  import jax.numpy as jnp

  from jaxtune import params as params_lib
  from jaxtune import sharding
  from jaxtune.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig
  from jaxtune.models import lora
  from jaxtune.models.model import init_params
  from jaxtune.tasks import TASKS
  from jaxtune.train import optim, steps
  from jaxtune.weights import pretrained

  mesh = sharding.make_mesh(MeshConfig())
  device = mesh.devices.flat[0]
  facts: dict[str, Any] = {"platform": device.platform, "device_kind": device.device_kind,
                           "device_count": int(mesh.devices.size)}
  if case.attention == "cudnn" and device.platform != "gpu":
    return {**facts, "status": f"unavailable on {device.platform}",
            "reason": "cuDNN fused attention runs only on NVIDIA GPUs; not attempted"}
  lora_cfg = LoraConfig(targets=LORA_TARGETS, rank=LORA_RANK, alpha=2.0 * LORA_RANK) if case.lora else LoraConfig()
  model_cfg = ModelConfig(path=case.model, compute_dtype="bfloat16", remat=case.remat, scan_layers=True,
                          attention=case.attention, lora=lora_cfg)
  model = pretrained.from_config(case.hf, model_cfg, 2 if case.task == "classification" else 0, mesh, case.seed)
  opt = OptimConfig(lr=1e-5, schedule="constant")
  tx = optim.make(opt, 1000)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, init_params(model, case.seed), tx, case.seed, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, TASKS[case.task], tx, optim.schedule(opt, 1000),
                               jnp.dtype(model_cfg.compute_dtype), shardings, batch_sharding, remat=case.remat)
  batch = jax.device_put(bench.batch_arrays(case), batch_sharding)
  adapters = sum(math.prod(a.shape) for p, a in params_lib.flatten(model.abstract).items() if lora.is_adapter(p))
  facts.update(steps.param_counts(model, state), adapter_params=adapters,
               flops_per_token=flops_per_token(case, adapters))
  tick = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  facts["compile_s"] = time.perf_counter() - tick
  analysis = compiled.memory_analysis()
  facts["xla_temp_bytes"] = getattr(analysis, "temp_size_in_bytes", None)
  # What model.attention became: `auto` picks per platform and falls back to XLA's ops where a kernel refuses.
  facts["cudnn_attention_calls"] = compiled.as_text().count("__cudnn$fmha")
  tick = time.perf_counter()
  for _ in range(case.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  facts["warmup_s"] = time.perf_counter() - tick
  tick = time.perf_counter()
  for _ in range(case.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - tick) / case.steps
  tokens = case.batch * case.length
  peak = perf.vendor_peak_flops(device.device_kind) if device.platform != "cpu" else None
  stats = device.memory_stats() or {}
  return {**facts, "status": "ok", "loss": float(metrics["loss"]), "step_s": step_s, "tokens_per_step": tokens,
          "tokens_per_s": tokens / step_s, "achieved_flops": facts["flops_per_token"] * tokens / step_s,
          "mfu": facts["flops_per_token"] * tokens / step_s / peak if peak else None,
          "peak_hbm_bytes": stats.get("peak_bytes_in_use"), "hbm_limit_bytes": stats.get("bytes_limit")}


def worker(case_json: str) -> None:
  """The worker process's body: one case, its result (or its failure) as one marked JSON line on stdout."""
  case = Case(**json.loads(case_json))
  try:
    result = measure(case)
  except Exception as e:  # noqa: BLE001 - an OOM or a refused kernel is a result, recorded, not a crash
    text = f"{type(e).__name__}: {e}"
    result = {"status": "oom" if _is_oom(text) else "error", "reason": text[:2000]}
  print(MARK + json.dumps(result), flush=True)


def _run_case(case: Case, timeout: float) -> dict[str, Any]:
  """One case in its own worker process (stderr passes through), killed after `timeout` seconds."""
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # jax's default 0.75 would call a 110 GiB case an OOM
  cmd = [sys.executable, "-m", "jaxtune.tools.gpu_bench", "worker", json.dumps(dataclasses.asdict(case))]
  try:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=max(timeout, 1.0), check=False)
  except subprocess.TimeoutExpired:
    return {"status": "skipped", "reason": f"time budget: killed after {timeout:.0f} s"}
  lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
  if lines:
    return json.loads(lines[-1][len(MARK):])
  # A worker that dies without a word: the kernel's OOM killer, a crash in a library; its stderr says more.
  return {"status": "error", "reason": f"worker exited with {done.returncode} without a result (see its stderr)"}


def _best_remat(results: list[dict[str, Any]]) -> str:
  """The remat policy of the fastest full fine-tune measured so far; `full` if none ran."""
  ok = [r for r in results if r["section"] == "remat" and r["status"] == "ok"]
  return max(ok, key=lambda r: r["tokens_per_s"])["remat"] if ok else "full"


def run(shape: str, output: Path, budget_s: float, only: str | None = None, warmup: int | None = None,
        steps: int | None = None) -> dict[str, Any]:
  """Every case of `plan` that fits the budget, one worker each; the report is rewritten to `output` after each."""
  import jax
  import jaxlib

  started = time.perf_counter()
  report: dict[str, Any] = {
      "schema": SCHEMA, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "shape": shape, "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
      "device_kind": None, "platform": None, "device_count": None, "peak_flops": None, "peak_note": None,
      "compute_dtype": "bfloat16", "param_dtype": "float32", "time_budget_s": budget_s,
      "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
      "flops_convention": {
          "full_ft": "6 * matmul params per token (attention, MLP, LM head; no embedding lookup, pooler or "
                     "classifier) + 12 * layers * length * heads * head_dim (attention scores and values, causal "
                     "masking not discounted); from the shape, not from XLA's cost analysis",
          "lora": "4 * matmul params of the frozen base (forward and activation gradients, no weight gradients) + "
                  "6 * adapter params + the same attention term"},
      "target": {"case": "llama-1b full-ft", "mfu": TARGET_MFU, "best_mfu": None, "met": None},
      "cases": []}
  for case in plan(shape, warmup, steps):
    if only and not any(part in case.name for part in only.split(",")):
      continue
    if case.remat == "best":
      case = dataclasses.replace(case, remat=_best_remat(report["cases"]))
    left = budget_s - (time.perf_counter() - started)
    same = [r["wall_s"] for r in report["cases"] if r["model"] == case.model and r.get("wall_s")]
    need = max(same, default=0.0)
    row = {k: v for k, v in dataclasses.asdict(case).items() if k != "hf"}
    tick = time.perf_counter()
    if left < max(need, 1.0):
      result = {"status": "skipped", "reason": f"time budget: {left:.0f} s left of {budget_s:.0f} s; the longest "
                                               f"{case.model} case so far took {need:.0f} s"}
    else:
      print(f"gpu_bench: {case.name} ({left:.0f} s of budget left)", file=sys.stderr, flush=True)
      result = _run_case(case, left)
      result["wall_s"] = time.perf_counter() - tick
    report["cases"].append({**row, **result})
    _summarise(report)
    _write(output, report)
  report["wall_s"] = time.perf_counter() - started
  _write(output, report)
  return report


def _summarise(report: dict[str, Any]) -> None:
  """The device facts and the target's verdict from the cases so far."""
  ran = [r for r in report["cases"] if r.get("device_kind")]
  if ran and report["device_kind"] is None:
    first = ran[0]
    report.update(device_kind=first["device_kind"], platform=first["platform"], device_count=first["device_count"])
    report["peak_flops"] = perf.vendor_peak_flops(first["device_kind"]) if first["platform"] != "cpu" else None
    if report["peak_flops"] is None:
      report["peak_note"] = (f"no datasheet dense bf16 peak for {first['device_kind']!r} ({first['platform']}) in "
                             "train/perf.py's VENDOR_BF16_PEAKS: MFU is null")
  mfus = [r["mfu"] for r in report["cases"] if r["section"] == "remat" and r["status"] == "ok" and r["mfu"]]
  if mfus:
    report["target"].update(best_mfu=max(mfus), met=max(mfus) >= TARGET_MFU)


def _write(path: Path, report: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=2) + "\n")
  tmp.replace(path)


def table(report: dict[str, Any]) -> str:
  """The report as aligned text: one line per case."""
  gib = lambda b: f"{b / 2**30:.1f}" if b else "-"
  lines = [(f"{report['device_kind']} ({report['platform']}), jax {report['jax_version']}, {report['shape']} shapes, "
            f"{report.get('wall_s', 0):.0f} s"),
           (f"{'case':<38} | {'status':<18} | {'tokens/s':>9} | {'step s':>7} | {'MFU':>6} | {'peak HBM GiB':>12} | "
            f"{'compile s':>9}")]
  for r in report["cases"]:
    ok = r["status"] == "ok"
    mfu = f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") else "-"
    lines.append(f"{r['name']:<38} | {r['status'][:18]:<18} | {r['tokens_per_s'] if ok else 0:>9.0f} | "
                 f"{r['step_s'] if ok else 0:>7.3f} | {mfu:>6} | {gib(r.get('peak_hbm_bytes')):>12} | "
                 f"{r.get('compile_s') or 0:>9.1f}")
  target = report["target"]
  if target["best_mfu"] is not None:
    lines.append(f"target: {target['case']} MFU >= {100 * target['mfu']:.0f}%: best {100 * target['best_mfu']:.1f}% "
                 f"({'met' if target['met'] else 'not met'})")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog="scripts/gpu_bench.sh", description=__doc__.split("\n\n")[0])
  parser.add_argument("output", nargs="?", default="gpu_bench.json", help="the JSON report (default: %(default)s)")
  parser.add_argument("--shape", choices=sorted(SHAPES), default="full",
                      help="full: the 1B Llama and BERT-base; tiny: the same cases on tiny shapes (CPU, tests)")
  parser.add_argument("--tiny", action="store_const", const="tiny", dest="shape", help="same as --shape tiny")
  parser.add_argument("--time-budget-s", type=float, default=450.0,
                      help="cases that would start past it are skipped, a running one is killed (default: %(default)s)")
  parser.add_argument("--only", help="run only the cases whose name contains this text (or, comma-separated, "
                                     "any of these texts)")
  parser.add_argument("--warmup", type=int, help="untimed steps per case (default: the shape's)")
  parser.add_argument("--steps", type=int, help="timed steps per case (default: the shape's)")
  args = parser.parse_args(argv)
  report = run(args.shape, Path(args.output), args.time_budget_s, args.only, args.warmup, args.steps)
  print(table(report))
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "worker":
    worker(sys.argv[2])
  else:
    sys.exit(main())
