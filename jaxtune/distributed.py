"""Multi-host start-up: jax.distributed from JAXTUNE_* env vars, or JAX's own detection of the cluster."""

from __future__ import annotations

import os
import re

import jax

from jaxtune.errors import UserError


def initialize() -> None:
  """Joins the process group when launched as one of several processes; a no-op otherwise.

  JAXTUNE_COORDINATOR=host:port with JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID: any cluster.
  An srun step of several tasks: JAX finds the coordinator (the step's first node, a port from the job id)
  and the process id; the process count is the step's, and each task drives the GPUs `_slurm_local_device_ids`
  gives it. JAXTUNE_DISTRIBUTED=auto, SLURM_NTASKS > 1 outside a step, or a TPU VM slice of several
  workers: JAX finds the coordinator, process count and process id itself.
  """
  coordinator = os.environ.get("JAXTUNE_COORDINATOR")
  mode = os.environ.get("JAXTUNE_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise UserError(f"JAXTUNE_DISTRIBUTED={mode!r}; set it to 'auto' (let JAX detect the cluster) or unset it.")
  step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")  # srun sets it in every task it starts
  if coordinator:
    try:
      num_processes, process_id = int(os.environ["JAXTUNE_NUM_PROCESSES"]), int(os.environ["JAXTUNE_PROCESS_ID"])
    except (KeyError, ValueError):
      raise UserError("JAXTUNE_COORDINATOR is set, so JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID must be set "
                      "to integers too (the process count, and this process's id from 0).") from None
    if not 0 <= process_id < num_processes:
      raise UserError(f"JAXTUNE_PROCESS_ID={process_id} is not in [0, JAXTUNE_NUM_PROCESSES={num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif step_tasks.isdigit():
    # The step's task count, not SLURM_NTASKS: `srun --preserve-env` passes the job's on.
    if int(step_tasks) > 1 or mode == "auto":
      jax.distributed.initialize(num_processes=int(step_tasks), local_device_ids=_slurm_local_device_ids())
  elif mode == "auto" or _detected_multi_process():
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX found no cluster to read the coordinator, process count or id from
      raise UserError(f"several processes were expected but jax.distributed found no cluster to join ({e}). "
                      "Under SLURM start one process per task with srun (a batch script's own shell is not a step "
                      "of several tasks); elsewhere set JAXTUNE_COORDINATOR, JAXTUNE_NUM_PROCESSES and "
                      "JAXTUNE_PROCESS_ID.") from None


def _detected_multi_process() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _slurm_local_device_ids() -> list[int] | None:
  """The GPUs an srun task drives, as jax.distributed.initialize's local_device_ids: [] for every GPU the task
  sees, None for JAX's default under SLURM (GPU number SLURM_LOCALID of those it sees: one task per GPU).

  The only task of the step on its node drives all its GPUs (JAX's default would leave it one). Several tasks on
  a node each drive their own: the ones SLURM bound to them (`--gpus-per-task`, `--gpu-bind`: the task sees
  fewer GPUs than SLURM_GPUS_ON_NODE), else one each by SLURM_LOCALID. JAX_LOCAL_DEVICE_IDS overrides this.
  """
  if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None  # JAX reads it
  if _slurm_tasks_on_node() == 1:
    return []
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ROCR_VISIBLE_DEVICES"))
  gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
  if visible is not None and gpus.isdigit() and len(visible.split(",")) < int(gpus):
    return []
  return None


def _slurm_tasks_on_node() -> int | None:
  """This node's task count in the srun step: SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of the first 3
  nodes, then 1) at SLURM_NODEID, the node's index in the step; None if either is missing or malformed."""
  counts = []
  for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
    if not (m := re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())):
      return None
    counts += [int(m[1])] * int(m[2] or 1)
  node = os.environ.get("SLURM_NODEID", "")
  return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None
