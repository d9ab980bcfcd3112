"""Classification metrics and the run log (progress bar + metrics.jsonl)."""

from __future__ import annotations

import json
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


class RunLog:
  """Appends records to run_dir/metrics.jsonl and drives a progress bar; silent off process 0."""

  def __init__(self, run_dir: Path, total_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    self.path = run_dir / "metrics.jsonl"
    self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.active, dynamic_ncols=True)

  def write(self, record: dict[str, Any]) -> None:
    if self.active:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")

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
