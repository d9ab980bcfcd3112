"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1) train exactly as one process with 8, each
tokenising only the train rows its devices hold."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, lm_config, records, run_script, with_devices

from jaxtune import distributed, sharding
from jaxtune import params as params_lib
from jaxtune.config import MeshConfig
from jaxtune.errors import UserError
from jaxtune.train import restore


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]



def launch_two_processes(multihost_config, run_dir, *overrides):
  """scripts/finetune.py as processes 0 and 1 of a 2-host job; returns their (returncode, stderr)."""
  port = free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, "XLA_FLAGS": with_devices(4),
           "JAXTUNE_COORDINATOR": f"127.0.0.1:{port}", "JAXTUNE_NUM_PROCESSES": "2", "JAXTUNE_PROCESS_ID": str(pid)}
    procs.append(subprocess.Popen([sys.executable, str(REPO / "scripts" / "finetune.py"), "--config",
                                   str(multihost_config), "--run-dir", str(run_dir), *overrides], cwd=REPO, env=env,
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  try:
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:  # one process failing leaves the other waiting on it
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_processes_match_one_process_with_eight_devices(multihost_config, tmp_path):
  mesh = ["mesh.data=4", "mesh.fsdp=2"]  # params sharded across the two processes, batch split over all 8
  one = run_script("finetune.py", "--config", multihost_config, "--run-dir", tmp_path / "one", *mesh,
                   env={**os.environ, "XLA_FLAGS": with_devices(8)})
  assert one.returncode == 0, one.stderr[-3000:]
  results = launch_two_processes(multihost_config, tmp_path / "two", *mesh)
  for code, _, err in results:
    assert code == 0, err[-3000:]
  # Logging and the final line come from process 0 only.
  assert "finished:" in results[0][1] and "finished:" not in results[1][1]
  want, got = records(tmp_path / "one"), records(tmp_path / "two")
  assert got[0]["processes"] == 2 and want[0]["processes"] == 1
  assert got[0]["mesh"] == want[0]["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  assert len(got) == len(want)  # one writer: no record was logged twice
  # Each process tokenised only the train rows its devices hold: half of each of the 4 batches of 16 rows (all
  # in the first epoch of 80 rows), where the one process tokenised all 80.
  rows = want[0]["train_rows_tokenized"]
  assert rows == [80] and got[0]["train_rows_tokenized"] == [4 * 16 // 2] * 2
  assert all(count <= 0.55 * rows[0] for count in got[0]["train_rows_tokenized"])
  # Losses, grad norms, lrs and validation metrics agree; gloo's all-reduce sums in another order
  # than XLA's in-process one, which moves the last bits.
  for w, g in zip(want, got, strict=True):
    assert g.keys() == w.keys()
    for key in set(w) - {"processes", "examples_per_s", "tokens_per_s", "train_rows_tokenized"}:
      assert g[key] == (pytest.approx(w[key], rel=1e-6, abs=1e-7) if isinstance(w[key], float) else w[key]), key
  # The checkpoint both processes wrote together holds the single-process params.
  single = params_lib.flatten(restore.restore_step(tmp_path / "one", "latest", sharding.make_mesh(MeshConfig()))[2])
  multi = params_lib.flatten(restore.restore_step(tmp_path / "two", "latest", sharding.make_mesh(MeshConfig()))[2])
  for path, value in single.items():
    np.testing.assert_allclose(np.asarray(multi[path]), np.asarray(value), atol=1e-6, rtol=0, err_msg=path)
  # Both runs continue for 2 more steps in one process on another layout (tensor2 x data4): the
  # 2-process checkpoint reshards onto it and the two runs go on logging the same losses.
  env = {**os.environ, "XLA_FLAGS": with_devices(8)}
  for run in ("one", "two"):
    result = run_script("finetune.py", "--config", multihost_config, "--run-dir", tmp_path / run, "--resume",
                        "--extend", "train.max_steps=6", "mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
  later = {run: [r["loss"] for r in records(tmp_path / run) if r["step"] > 4 and "loss" in r and "split" not in r]
           for run in ("one", "two")}
  assert len(later["one"]) == 2
  np.testing.assert_allclose(later["two"], later["one"], rtol=1e-6)
  starts = [r for r in records(tmp_path / "two") if r.get("event") in ("start", "resume")]
  assert [r["mesh"] for r in starts] == [{"data": 4, "fsdp": 2, "tensor": 1}, {"data": 4, "fsdp": 1, "tensor": 2}]
  assert [r["processes"] for r in starts] == [2, 1]


def test_two_processes_quantise_an_nf4_base_and_train_it_as_one_process(tiny_llama_dir, reviews, tmp_path):
  """QLoRA across processes, params split over both (fsdp=8): each process quantises the NF4 kernels' shards its
  devices hold, the absmaxes' mean taken over both processes' blocks, and LoRA trains as in one process."""
  path = lm_config(tmp_path, tiny_llama_dir, reviews, prompt_template="{review:.150}\n", response_column="score",
                   sections={"model": {"frozen_dtype": "nf4",
                                       "lora": {"targets": [r"layers\.(attn|mlp)\..*\.kernel"], "rank": 4}},
                             "train": {"max_steps": 3}})
  mesh = ["mesh.data=1", "mesh.fsdp=8"]
  one = run_script("finetune.py", "--config", path, "--run-dir", tmp_path / "one", *mesh,
                   env={**os.environ, "XLA_FLAGS": with_devices(8)})
  assert one.returncode == 0, one.stderr[-3000:]
  for code, _, err in launch_two_processes(path, tmp_path / "two", *mesh):
    assert code == 0, err[-3000:]
  want, got = records(tmp_path / "one"), records(tmp_path / "two")
  assert got[0]["processes"] == 2
  losses = {run: [(r["step"], r.get("split"), r["loss"]) for r in recs if "loss" in r]
            for run, recs in (("one", want), ("two", got))}
  assert len(losses["one"]) == 4 and [k[:2] for k in losses["two"]] == [k[:2] for k in losses["one"]]
  np.testing.assert_allclose([k[2] for k in losses["two"]], [k[2] for k in losses["one"]], rtol=1e-5)


@pytest.mark.parametrize(("env", "want"), [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),
    ({"JAXTUNE_DISTRIBUTED": "auto"}, {}),
    ({"JAXTUNE_COORDINATOR": "10.0.0.1:1234", "JAXTUNE_NUM_PROCESSES": "16", "JAXTUNE_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 16, "process_id": 3}),
])
def test_distributed_initialize_reads_the_launch_environment(monkeypatch, env, want):
  calls = []
  for key in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAXTUNE_DISTRIBUTED", "JAXTUNE_COORDINATOR"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(distributed, "_join", lambda **kwargs: calls.append(kwargs))
  distributed.initialize()
  assert calls == ([] if want is None else [want])


@pytest.mark.parametrize("env", [
    {"JAXTUNE_COORDINATOR": "h:1", "JAXTUNE_NUM_PROCESSES": "2"},
    {"JAXTUNE_COORDINATOR": "h:1", "JAXTUNE_NUM_PROCESSES": "2", "JAXTUNE_PROCESS_ID": "2"},
    {"JAXTUNE_DISTRIBUTED": "yes"},
])
def test_distributed_launch_mistakes_are_user_errors(monkeypatch, env):
  monkeypatch.delenv("JAXTUNE_PROCESS_ID", raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setattr(distributed, "_join", lambda **kwargs: pytest.fail("initialised despite the error"))
  with pytest.raises(UserError, match="JAXTUNE_"):
    distributed.initialize()
