"""The one-shot GPU benchmark runs end to end on this CPU with tiny shapes: every case of the GPU run, one worker
process each, one JSON report whose numbers are usable, and cuDNN attention recorded as unavailable, not a crash."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_COMPILE  # XLA:CPU without LLVM's optimisations: the tiny run checks the report, not speed

from jaxtune.tools import gpu_bench

ROOT = Path(__file__).resolve().parents[1]


# A case of every section and kind: full fine-tune, LoRA (with remat), both attention kernels on both models. The
# other remat policies are the same code with another model.remat. All 12 tiny cases took 207 s on this 2-core machine
# under load (each compiles its own step); these 6 (2 of them cuDNN, recorded unavailable) took 58 s.
SUBSET = "full-ft remat=none,attention=,lora remat=full"


@pytest.mark.slow  # ~65 s of CPU for a report format; the measurement itself needs the GPU CI never has
def test_tiny_run_writes_a_complete_report(tmp_path):
  out = tmp_path / "bench.json"
  done = subprocess.run(["bash", str(ROOT / "scripts/gpu_bench.sh"), "--tiny", str(out), "--time-budget-s", "900",
                         "--only", SUBSET],
                        env={**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": FAST_COMPILE}, capture_output=True,
                        text=True, timeout=1200,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["schema"] == gpu_bench.SCHEMA and report["shape"] == "tiny"
  for key in ("date", "jax_version", "jaxlib_version", "device_kind", "flops_convention", "target", "wall_s"):
    assert report[key], key
  assert report["platform"] == "cpu" and report["peak_flops"] is None and "MFU is null" in report["peak_note"]
  wanted = [c.name for c in gpu_bench.plan("tiny") if any(part in c.name for part in SUBSET.split(","))]
  assert [c["name"] for c in report["cases"]] == wanted and len(wanted) == 6
  by_name = {c["name"]: c for c in report["cases"]}
  for name, case in by_name.items():
    if case["attention"] == "cudnn":
      assert case["status"] == "unavailable on cpu", case
      continue
    assert case["status"] == "ok", case
    for key in ("step_s", "tokens_per_s", "flops_per_token", "achieved_flops", "compile_s", "loss"):
      assert math.isfinite(case[key]) and case[key] > 0, (name, key, case[key])
    assert case["mfu"] is None  # no datasheet peak for a CPU
    assert case["tokens_per_step"] == case["batch"] * case["length"]
  # LoRA trains only its adapters, and its FLOPs count no weight gradients of the frozen base.
  full, adapted = by_name["llama-1b full-ft remat=none"], by_name["llama-1b lora remat=full"]
  assert 0 < adapted["trainable_params"] == adapted["adapter_params"] < full["trainable_params"]
  assert adapted["flops_per_token"] < full["flops_per_token"]
  # The attention cases of the 1B run at the fastest full fine-tune policy.
  fastest = max((c for c in report["cases"] if c["section"] == "remat"), key=lambda c: c["tokens_per_s"])
  assert by_name["llama-1b attention=xla"]["remat"] == fastest["remat"]


def test_flops_from_the_shape():
  """The 1B's FLOPs per token by hand: 6 N + attention for full fine-tuning, 4 N + 6 N_adapter + attention for LoRA."""
  llama = next(c for c in gpu_bench.plan("full") if c.model == "llama-1b")
  d, f, layers, kv = 2048, 8192, 16, 512
  n = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * 128256  # q, o; k, v; gate, up, down; the tied LM head
  attention = 12 * layers * 2048 * d
  assert gpu_bench.flops_per_token(llama, 0) == 6 * n + attention
  lora = dataclasses.replace(llama, lora=True)
  assert gpu_bench.flops_per_token(lora, 1000) == 4 * n + 6 * 1000 + attention


def test_a_budget_too_small_skips_with_a_reason(tmp_path):
  """No case starts once the budget is spent: each is recorded as skipped, and the report is still written."""
  out = tmp_path / "bench.json"
  report = gpu_bench.run("tiny", out, budget_s=0.0)
  assert json.loads(out.read_text())["cases"] == report["cases"]
  assert {c["status"] for c in report["cases"]} == {"skipped"}
  assert all("time budget" in c["reason"] for c in report["cases"])



def test_worker_records_an_oom_and_an_error(monkeypatch, capsys):
  """A case that runs out of device memory is a result ("oom"), as is any other failure ("error"), never a crash."""
  case = json.dumps(dataclasses.asdict(gpu_bench.plan("tiny")[0]))
  for message, status in (("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB", "oom"),
                          ("Bias must have same seq length as QKV", "error")):
    def fail(_case, message=message):
      raise RuntimeError(message)

    monkeypatch.setattr(gpu_bench, "measure", fail)
    gpu_bench.worker(case)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line.removeprefix(gpu_bench.MARK))
    assert result["status"] == status and message in result["reason"]
