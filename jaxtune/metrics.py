"""Classification metrics and the run log (progress bar + metrics.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm


def classification(preds: np.ndarray, labels: np.ndarray, losses: np.ndarray, num_classes: int) -> dict[str, float]:
  """accuracy, macro F1 (mean over classes of the training label set), mean loss, example count."""
  f1s = []
  for c in range(num_classes):
    tp = np.sum((preds == c) & (labels == c))
    denom = np.sum(preds == c) + np.sum(labels == c)
    f1s.append(2 * tp / denom if denom else 0.0)
  return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s)),
          "loss": float(np.mean(losses)), "num_examples": len(labels)}


def json_safe(value: Any) -> Any:
  """`value` with NaN and infinities replaced by null, which JSON (unlike Python's json) allows."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


class RunLog:
  """Appends records to run_dir/metrics.jsonl and drives a progress bar; silent off process 0.

  Started at step S > 0 (a resume), it first drops the records of steps after S, which the
  resumed run writes again, so the file holds each step once.
  """

  def __init__(self, run_dir: Path, total_steps: int, start_step: int):
    from jaxtune import rundir

    self.active = jax.process_index() == 0
    self.path = run_dir / "metrics.jsonl"
    if self.active and self.path.exists():
      lines = self.path.read_text().splitlines()
      kept = [line for line in lines if _step_of(line) <= start_step]
      if len(kept) < len(lines):
        rundir.write_text(self.path, "".join(line + "\n" for line in kept))
    self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.active, dynamic_ncols=True)

  def write(self, record: dict[str, Any]) -> None:
    if self.active:
      with self.path.open("a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

  def train(self, step: int, record: dict[str, float]) -> None:
    self.write({"step": step, **record})
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

  def eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
    self.write({"step": step, "split": split, **metrics})
    if self.active:
      shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
      self.bar.write(f"step {step} {split}: {shown}")

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def close(self) -> None:
    self.bar.close()


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf
