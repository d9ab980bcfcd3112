"""RUN_DIR/summary.json: one record of a finished (or stopped) run, for comparing runs side by side."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from jaxtune import sharding, tasks
from jaxtune.config import Config
from jaxtune.train import runlog

PACKAGES = ("jaxtune", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")


def git_commit(path: Path) -> str | None:
  """The commit of the git checkout `path` is in (with `+dirty` for uncommitted changes), or None."""
  try:
    def git(*args: str) -> str:
      return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10,
                            check=True).stdout.strip()
    commit = git("rev-parse", "HEAD")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.SubprocessError):
    return None


def versions() -> dict[str, str | None]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def best_eval(records: list[dict[str, Any]], metric: str | None, mode: str) -> dict[str, Any] | None:
  """The eval record with the best `metric` (checkpoint.best_metric), or None without one."""
  scored = [r for r in records if metric and isinstance(r.get(metric), (int, float))]
  if not scored:
    return None
  return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


def build(cfg: Config, run_dir: Path, report: dict[str, Any], sizes: dict[str, int], mesh: Mesh,
          final_step: int, total_steps: int, status: str) -> dict[str, Any]:
  """The summary of a run: versions, devices, mesh, commit, seed, time by phase, throughput, MFU, memory,
  param counts and the best and last validation metrics."""
  evals = [r for r in runlog.read_records(run_dir) if r.get("split") == "validation"]
  best = tasks.checkpoint_config(cfg)
  return {
      "status": status, "step": final_step, "total_steps": total_steps, "task": cfg.task, "model": cfg.model.path,
      "seed": cfg.train.seed, "versions": versions(), "git_commit": git_commit(Path(__file__).parent),
      "devices": sharding.device_facts(mesh), "mesh": dict(mesh.shape), **sizes,
      "lora": {"targets": list(cfg.model.lora.targets), "rank": cfg.model.lora.rank} if cfg.model.lora.on else None,
      "timing": report,
      "best_eval": best_eval(evals, best.best_metric, best.best_direction),
      "last_eval": evals[-1] if evals else None,
  }
