"""Seeds studies: one recipe trained by jaxtune and by the PyTorch reference for several seeds, and the
mean and standard deviation of each side's test metrics.

Every run is its own process, as a user would start it (scripts/finetune.py then scripts/evaluate.py;
scripts/torch_reference.py). A run whose result is already in the study directory is skipped, so an
interrupted study picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxtune import cli
from jaxtune import config as config_lib
from jaxtune.errors import UserError

SIDES = ("jaxtune", "torch")
# The test metrics a report shows, per task; the first is the headline, compared in points.
METRICS = {"classification": ("accuracy", "macro_f1", "loss"), "causal_lm": ("exact_match", "loss", "perplexity")}
BAR = 0.005  # headline means within half a point (of a 0..1 fraction)


@dataclasses.dataclass(frozen=True)
class Study:
  config: Path  # the recipe, as for scripts/finetune.py
  out: Path  # the study directory: runs, per-seed results, report.json / report.md
  seeds: tuple[int, ...] = (0, 1, 2)  # each run sets train.seed (init of new params, dropout, data order)
  overrides: tuple[str, ...] = ()  # dotted key=value, applied to both sides
  step: str = "latest"  # the jaxtune checkpoint scored; the reference scores its final step, so latest
  max_examples: int | None = None  # score only the first N test rows
  init: str = "torch"  # who initialises the reference's new params: torch (its own RNG) or jaxtune (ours)
  sides: tuple[str, ...] = SIDES


def result_path(study: Study, side: str, seed: int) -> Path:
  return study.out / side / f"seed{seed}.json"


def commands(study: Study, side: str, seed: int) -> list[list[str]]:
  """The processes that produce one side's result for one seed."""
  overrides = [*study.overrides, f"train.seed={seed}"]
  limit = ["--max-examples", str(study.max_examples)] if study.max_examples else []
  if side == "torch":
    return [[*cli.command("torch-reference"), "--config", str(study.config), "--init", study.init,
             "--output", str(study.out / side / f"seed{seed}.raw.json"), *limit, *overrides]]
  run_dir = study.out / side / f"seed{seed}"
  train = [*cli.command("finetune"), "--config", str(study.config), "--run-dir", str(run_dir),
           *overrides]
  if (run_dir / "summary.json").exists():  # finished (finetune.py writes it last), stopped before its scoring
    train = []
  elif (run_dir / "config.yaml").exists():  # interrupted: continues
    train.append("--resume")
  score = [*cli.command("evaluate"), "--checkpoint", str(run_dir), "--step", study.step,
           "--split", "test", "--output", str(study.out / side / f"seed{seed}.eval.json"), *limit]
  return [cmd for cmd in (train, score) if cmd]


def run_one(study: Study, side: str, seed: int) -> dict[str, Any]:
  """Runs one side for one seed (unless its result exists) and returns {seed, test, seconds}."""
  path = result_path(study, side, seed)
  if path.exists():
    return json.loads(path.read_text())
  path.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  for cmd in commands(study, side, seed):
    if (code := subprocess.run(cmd).returncode) != 0:
      raise UserError(f"the {side} run for seed {seed} failed (exit {code}: {' '.join(cmd[3:5])}); its output is "
                      "above. Fix it and rerun the study: finished runs are kept.")
  raw = json.loads(path.with_suffix(".raw.json" if side == "torch" else ".eval.json").read_text())
  result = {"seed": seed, "test": raw["test"] if side == "torch" else raw, "seconds": time.perf_counter() - start}
  path.write_text(json.dumps(result, indent=2) + "\n")
  return result


def run(study: Study, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every side and seed of the study, then its report (written as report.json and report.md)."""
  cfg = config_lib.load(study.config, study.overrides)  # a bad config fails here, before any run starts
  if unknown := set(study.sides) - set(SIDES):
    raise UserError(f"unknown sides {sorted(unknown)}; choose from {list(SIDES)}.")
  results: dict[str, dict[int, dict[str, Any]]] = {side: {} for side in study.sides}
  for seed in study.seeds:
    for side in study.sides:
      log(f"== {side}, seed {seed}")
      results[side][seed] = run_one(study, side, seed)
  report = summarise(cfg.task, {side: {s: r["test"] for s, r in runs.items()} for side, runs in results.items()})
  report["seconds"] = {side: statistics.mean(r["seconds"] for r in runs.values()) for side, runs in results.items()}
  report.update(config=str(study.config), overrides=list(study.overrides), step=study.step,
                max_examples=study.max_examples, init=study.init)
  (study.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  (study.out / "report.md").write_text(markdown(report))
  return report


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(task: str, tests: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """Per metric and side: the per-seed values, mean and std; with both sides, jaxtune - torch and the bars."""
  report: dict[str, Any] = {"task": task, "metrics": {}}
  for metric in METRICS[task]:
    row = {}
    for side, by_seed in tests.items():
      values = [float(by_seed[s][metric]) for s in sorted(by_seed)]
      mean, std = mean_std(values)
      row[side] = {"seeds": sorted(by_seed), "values": values, "mean": mean, "std": std}
    if set(SIDES) <= set(row):
      row["difference"] = row["jaxtune"]["mean"] - row["torch"]["mean"]
    report["metrics"][metric] = row
  headline = report["metrics"][METRICS[task][0]]
  if "difference" in headline:
    gap, spread = abs(headline["difference"]), headline["torch"]["std"]
    report["headline"] = {"metric": METRICS[task][0], "difference": headline["difference"], "within_bar": gap <= BAR,
                          "within_torch_std": gap <= spread, "standard_error": _standard_error(headline)}
  return report


def _standard_error(row: dict[str, Any]) -> float:
  """Of the difference of the two means (Welch): sqrt(s_j^2 / n_j + s_t^2 / n_t)."""
  return math.sqrt(sum(row[s]["std"] ** 2 / len(row[s]["values"]) for s in SIDES))


def markdown(report: dict[str, Any]) -> str:
  """The report as a markdown table: mean +/- std (per-seed values) per side, and the difference."""
  sides = [s for s in SIDES if s in next(iter(report["metrics"].values()))]
  names = {"jaxtune": "jaxtune", "torch": "PyTorch reference"}
  lines = ["| test metric | " + " | ".join(names[s] for s in sides) + (" | jaxtune - PyTorch |" if len(sides) == 2
                                                                         else " |"),
           "|---" * (len(sides) + 1 + (len(sides) == 2)) + "|"]
  for metric, row in report["metrics"].items():
    cells = [f"{row[s]['mean']:.4f} ± {row[s]['std']:.4f} ({', '.join(f'{v:.4f}' for v in row[s]['values'])})"
             for s in sides]
    diff = [f"{row['difference']:+.4f}"] if "difference" in row else []
    lines.append(f"| {metric} | " + " | ".join(cells + diff) + " |")
  if "headline" in report:
    h = report["headline"]
    lines.append("")
    lines.append(f"{h['metric']}: jaxtune - PyTorch = {100 * h['difference']:+.2f} points (standard error "
                 f"{100 * h['standard_error']:.2f}); within 0.5 point: {'yes' if h['within_bar'] else 'no'}; "
                 f"within PyTorch's standard deviation: {'yes' if h['within_torch_std'] else 'no'}.")
  return "\n".join(lines) + "\n"
