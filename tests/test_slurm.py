"""docs/scaling.md's SLURM recipe, started the way srun starts it: one process per task with the SLURM_* variables srun
sets (and no JAXTUNE_COORDINATOR), so that jax.distributed's own SLURM detection finds the coordinator (the
step's first node, a port from the job id), the process count and each process's id. The nodes are this machine
(2-node layouts name it twice in a compressed nodelist) and the GPUs are CPU devices: what each task would hand
the GPU client is read from JAX's config (jax_cuda_visible_devices), as no GPU is here to take it."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import socket
import subprocess
import sys

import pytest
from conftest import REPO, records, run_script, with_devices

from jaxtune import distributed

# What a cluster, the test session (conftest's compile-only TPU settings) or the caller set, and srun would not.
NOT_FROM_SRUN = ("SLURM_", "JAXTUNE_", "TPU_", "OMPI_", "ALLOW_MULTIPLE_LIBTPU_LOAD", "JAX_COORDINATOR",
                 "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")

# One task of the step: joins the group as jaxtune does, all-gathers (process index, local device count) over it,
# and prints what it found.
PROBE = """
import json
import jax
import numpy as np
from jax._src import distributed as jax_distributed  # where JAX keeps the coordinator address it settled on
from jax.experimental import multihost_utils
from jaxtune import distributed
distributed.initialize()
mine = np.array([jax.process_index(), jax.local_device_count()])
print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                  "coordinator": jax_distributed.global_state.coordinator_address,
                  "cuda_visible_devices": jax.config.values["jax_cuda_visible_devices"],
                  "gathered": multihost_utils.process_allgather(mine).tolist()}))
"""


def free_job_id() -> tuple[int, int]:
  """A SLURM job id whose coordinator port (JAX's: 61440 + id % 4096) nothing listens on now, and that port."""
  for port in random.sample(range(61440, 65536), 200):
    free = True
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # JAX binds [::]:port
      try:
        with socket.socket(family) as s:
          s.bind((host, port))
      except OSError as e:
        free = free and e.errno != errno.EADDRINUSE
    if free:
      return 4096 * 1000 + port - 61440, port
  raise RuntimeError("no free port in 61440-65535")


def compressed(counts: list[int]) -> str:
  """Per-node counts as SLURM writes them: [2, 2, 2, 1] -> '2(x3),1'."""
  runs = [(n, len(list(group))) for n, group in itertools.groupby(counts)]
  return ",".join(f"{n}(x{k})" if k > 1 else str(n) for n, k in runs)


def srun_env(job_id: int, nodelist: str, tasks_per_node: list[int], rank: int, devices: int,
             gpus: dict[str, str] | None = None, job_tasks: int | None = None) -> dict[str, str]:
  """The environment srun gives task `rank` of a one-step job (block distribution: the first node's tasks first),
  `devices` CPU devices standing for its GPUs; `gpus`: SLURM's GPU variables for the task; `job_tasks`: the
  job's SLURM_NTASKS, which `srun --preserve-env` passes on in place of the step's."""
  node = next(i for i in range(len(tasks_per_node)) if rank < sum(tasks_per_node[:i + 1]))
  first = sum(tasks_per_node[:node])
  steps = len(tasks_per_node), sum(tasks_per_node), compressed(tasks_per_node)
  return {
      **{k: v for k, v in os.environ.items() if not k.startswith(NOT_FROM_SRUN)},
      "XLA_FLAGS": with_devices(devices),
      "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
      "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
      "SLURM_JOB_NUM_NODES": str(steps[0]), "SLURM_NNODES": str(steps[0]), "SLURM_STEP_NUM_NODES": str(steps[0]),
      "SLURM_NTASKS": str(job_tasks or steps[1]), "SLURM_NPROCS": str(job_tasks or steps[1]),
      "SLURM_STEP_NUM_TASKS": str(steps[1]),
      "SLURM_TASKS_PER_NODE": steps[2], "SLURM_STEP_TASKS_PER_NODE": steps[2],
      "SLURM_NODEID": str(node), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank - first),
      "SLURM_GTIDS": ",".join(map(str, range(first, first + tasks_per_node[node]))),
      **(gpus or {}),
  }


def srun(argv: list[str], envs: list[dict[str, str]], timeout: float) -> list[tuple[int, str, str]]:
  """Starts one process per env at once, as srun does; their (returncode, stdout, stderr)."""
  procs = [subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for env in envs]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:  # one task failing leaves the others waiting for it
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


# (srun layout, nodelist, tasks per node, each task's GPU variables, the job's SLURM_NTASKS, want visible devices)
LAYOUTS = {
    # --nodes=2 --ntasks-per-node=1 --gpus-per-node=8: each task drives all 8 GPUs of its node.
    "node_per_task": ("127.0.0.[1-2]", [1, 1],
                      [{"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}] * 2,
                      None, ["all", "all"]),
    # --nodes=1 --ntasks-per-node=2 --gpus-per-node=2: both tasks see both GPUs; JAX gives each the one at its
    # SLURM_LOCALID. `srun --preserve-env` inside a 4-task job: SLURM_NTASKS=4 stays, the step has 2.
    "gpu_per_task": ("localhost", [2], [{"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}] * 2,
                     4, ["0", "1"]),
    # --ntasks=2 --gpus-per-task=1: SLURM binds each task its own GPU, the only one it sees.
    "bound_gpu_per_task": ("localhost", [2], [{"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_TASK": "1",
                                               "CUDA_VISIBLE_DEVICES": str(i)} for i in range(2)],
                           None, ["all", "all"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_srun_tasks_join_one_group_from_slurm_variables(layout):
  nodelist, tasks_per_node, gpus, job_tasks, want_visible = LAYOUTS[layout]
  job_id, port = free_job_id()
  envs = [srun_env(job_id, nodelist, tasks_per_node, rank, devices=2, gpus=gpus[rank], job_tasks=job_tasks)
          for rank in range(2)]
  results = srun([sys.executable, "-c", PROBE], envs, timeout=120)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  # the probe's JSON object: gloo's own "[Gloo] Rank ... connected" text may come before or after it, on its line
  found = [json.JSONDecoder().raw_decode(out[out.rindex('{"process_index"'):])[0] for _, out, _ in results]
  first_node = {"127.0.0.[1-2]": "127.0.0.1", "localhost": "localhost"}[nodelist]
  for rank, got in enumerate(found):
    assert got["process_index"] == rank and got["process_count"] == 2
    assert got["coordinator"] == f"{first_node}:{port}"  # the step's first node; the port from the job id
    assert got["local_devices"] == 2 and got["devices"] == 4  # its own devices; the group's are both tasks'
    assert got["gathered"] == [[0, 2], [1, 2]]  # a collective over both processes
    assert got["cuda_visible_devices"] == want_visible[rank]  # the GPUs it would drive


# Marked slow (about 100 s of CPU in CI): test_multihost proves two processes train as one with eight devices, and
# test_srun_tasks_join_one_group_from_slurm_variables that srun's variables make that group.
@pytest.mark.slow
def test_readme_srun_recipe_trains_as_one_process(multihost_config, tmp_path):
  """`srun python scripts/finetune.py ...` on 2 nodes x 1 task, 4 devices each, logs what one process with 8 does."""
  mesh = ["mesh.data=4", "mesh.fsdp=2"]  # params sharded over both tasks' devices
  one = run_script("finetune.py", "--config", multihost_config, "--run-dir", tmp_path / "one", *mesh,
                   env={**os.environ, "XLA_FLAGS": with_devices(8)})
  assert one.returncode == 0, one.stderr[-3000:]
  job_id, _ = free_job_id()
  gpus = {"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  envs = [srun_env(job_id, "127.0.0.[1-2]", [1, 1], rank, devices=4, gpus=gpus) for rank in range(2)]
  argv = [sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(multihost_config), "--run-dir",
          str(tmp_path / "two"), "--quiet", *mesh]
  results = srun(argv, envs, timeout=600)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  assert "finished:" in results[0][1] and "finished:" not in results[1][1]  # SLURM_PROCID 0 is process 0
  want, got = records(tmp_path / "one"), records(tmp_path / "two")
  assert got[0]["processes"] == 2 and got[0]["mesh"] == want[0]["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  assert len(got[0]["train_rows_tokenized"]) == 2 and len(got) == len(want)
  for w, g in zip(want, got, strict=True):  # gloo's all-reduce moves the last bits
    assert g.keys() == w.keys()
    for key in set(w) - {"processes", "examples_per_s", "tokens_per_s", "train_rows_tokenized"}:
      assert g[key] == (pytest.approx(w[key], rel=1e-6, abs=1e-7) if isinstance(w[key], float) else w[key]), key


@pytest.mark.parametrize(("env", "want"), [
    # srun's own variables: the step's task count, and the GPUs each task drives.
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, None),  # `srun --preserve-env -n1` in a 4-task job
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_NODEID": "3"},
     {"num_processes": 4, "local_device_ids": []}),
    ({"SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "4,1", "SLURM_NODEID": "0"},
     {"num_processes": 5, "local_device_ids": None}),
    ({"SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "4,1", "SLURM_NODEID": "1"},
     {"num_processes": 5, "local_device_ids": []}),
    ({"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "2(x8)", "SLURM_NODEID": "5",
      "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, {"num_processes": 16, "local_device_ids": []}),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "0",
      "JAX_LOCAL_DEVICE_IDS": "0,1"}, {"num_processes": 2, "local_device_ids": None}),
])
def test_srun_step_sets_process_count_and_local_devices(monkeypatch, env, want):
  calls = []
  for key in [k for k in os.environ if k.startswith(NOT_FROM_SRUN)]:
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(distributed, "_join", lambda **kwargs: calls.append(kwargs))
  distributed.initialize()
  assert calls == ([] if want is None else [want])


def test_several_tasks_outside_an_srun_step_is_a_user_error(tmp_path):
  """A batch script of --ntasks=2 running python itself, not through srun: SLURM_NTASKS=2 but no step, so JAX
  finds no coordinator; one line says to use srun."""
  job_id, _ = free_job_id()
  env = {k: v for k, v in srun_env(job_id, "localhost", [2], 0, devices=1).items() if "STEP" not in k}
  result = run_script("finetune.py", "--config", tmp_path / "c.yaml", "--run-dir", tmp_path / "run", env=env)
  assert result.returncode == 2 and "error: " in result.stderr and "srun" in result.stderr, result.stderr[-3000:]
