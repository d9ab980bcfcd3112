"""Multi-host start-up: jax.distributed from JAXTUNE_* env vars, or JAX's own auto-detection."""

from __future__ import annotations

import os

import jax


def initialize() -> None:
  """Joins the process group when launched as one of several processes; a no-op otherwise."""
  coordinator = os.environ.get("JAXTUNE_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAXTUNE_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAXTUNE_PROCESS_ID"]))
  elif any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")) and _multi():
    jax.distributed.initialize()  # JAX detects SLURM and TPU pods itself


def _multi() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
