"""Multi-host start-up: jax.distributed from JAXTUNE_* env vars, or JAX's own detection of the cluster."""

from __future__ import annotations

import os

import jax

from jaxtune.errors import UserError


def initialize() -> None:
  """Joins the process group when launched as one of several processes; a no-op otherwise.

  JAXTUNE_COORDINATOR=host:port with JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID: any cluster.
  JAXTUNE_DISTRIBUTED=auto, a SLURM step of several tasks, or a TPU VM slice of several workers:
  JAX finds the coordinator, process count and process id itself.
  """
  coordinator = os.environ.get("JAXTUNE_COORDINATOR")
  mode = os.environ.get("JAXTUNE_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise UserError(f"JAXTUNE_DISTRIBUTED={mode!r}; set it to 'auto' (let JAX detect the cluster) or unset it.")
  if coordinator:
    try:
      num_processes, process_id = int(os.environ["JAXTUNE_NUM_PROCESSES"]), int(os.environ["JAXTUNE_PROCESS_ID"])
    except (KeyError, ValueError):
      raise UserError("JAXTUNE_COORDINATOR is set, so JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID must be set "
                      "to integers too (the process count, and this process's id from 0).") from None
    if not 0 <= process_id < num_processes:
      raise UserError(f"JAXTUNE_PROCESS_ID={process_id} is not in [0, JAXTUNE_NUM_PROCESSES={num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif mode == "auto" or _detected_multi_process():
    jax.distributed.initialize()


def _detected_multi_process() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
