"""Runs side by side: a table (markdown or CSV) of finished or running run dirs, and their curves in one figure."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxtune.errors import UserError
from jaxtune.train import runlog

COLUMNS = ("run", "status", "step", "model", "lora", "trainable_params", "best", "last", "tokens_per_s", "mfu",
           "train_s", "wall_s", "peak_host_gb")


def read_run(run_dir: Path) -> dict[str, Any]:
  """One run dir's row: summary.json when the run finished, else what its config and metrics.jsonl say."""
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").is_file():
    raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass run dirs written by finetune.py.")
  records = runlog.read_records(run_dir)
  evals = [r for r in records if r.get("split") == "validation"]
  steps = [r["step"] for r in records if "loss" in r and "split" not in r]
  summary_path = run_dir / "summary.json"
  if summary_path.is_file():
    summary = json.loads(summary_path.read_text())
    timing = summary.get("timing") or {}
    lora = summary.get("lora")
    return {"run": run_dir.name, "status": summary.get("status", "finished"), "step": summary.get("step"),
            "model": summary.get("model"), "lora": f"rank {lora['rank']}" if lora else "",
            "trainable_params": summary.get("trainable_params"), "best": _metrics(summary.get("best_eval")),
            "last": _metrics(summary.get("last_eval")), "tokens_per_s": timing.get("tokens_per_s"),
            "mfu": timing.get("mfu"), "train_s": timing.get("train_s"), "wall_s": timing.get("wall_s"),
            "peak_host_gb": timing["peak_host_bytes"] / 1e9 if timing.get("peak_host_bytes") else None,
            "records": records}
  start = next((r for r in records if r.get("event") in ("start", "resume")), {})
  return {"run": run_dir.name, "status": "unfinished", "step": steps[-1] if steps else 0, "model": None, "lora": "",
          "trainable_params": start.get("trainable_params"), "best": "", "last": _metrics(evals[-1] if evals else None),
          "tokens_per_s": None, "mfu": None, "train_s": None, "wall_s": None, "peak_host_gb": None, "records": records}


def _metrics(record: dict[str, Any] | None) -> str:
  if not record:
    return ""
  skip = {"step", "split", "samples", "num_examples", "num_tokens"}
  shown = [f"{k} {v:.4f}" for k, v in record.items() if k not in skip and isinstance(v, float)]
  return f"step {record.get('step')}: " + ", ".join(shown)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(row[c]).replace("|", "/") for c in COLUMNS) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(COLUMNS)
  for row in rows:
    writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
  return out.getvalue()


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
  """Train loss (left) and each validation metric (right) against step, one line per run, in one PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
  for row in rows:
    train = [r for r in row["records"] if "loss" in r and "split" not in r and r.get("loss") is not None]
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label=row["run"])
    evals = [r for r in row["records"] if r.get("split") == "validation"]
    for key in sorted({k for r in evals for k, v in r.items() if isinstance(v, float)}):
      points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), float)]
      right.plot(*zip(*points), marker="o", label=f"{row['run']}: {key}")
  left.set(title="train loss", xlabel="step", ylabel="loss")
  right.set(title="validation", xlabel="step")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
