"""The same tiny BERT run on 8 simulated devices under each mesh layout logs the 1-device losses.

A first step towards the scale-out issue: the rules table shards params over fsdp and tensor, and
the jitted step must not change the numbers. (Per-parameter sharding checks come with that issue.)
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_script, write_config

MESHES = {"data8": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
          "tensor2_data4": {"data": 4, "fsdp": 1, "tensor": 2}}


def losses(run_dir):
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return records[0]["mesh"], [r["loss"] for r in records if "loss" in r and "split" not in r]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tiny_bert_dir, reviews):
  tmp = tmp_path_factory.mktemp("mesh1")
  cfg = write_config(tmp / "c.yaml", tiny_bert_dir, reviews)
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  return cfg, losses(tmp / "run")[1]


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_layouts_match_one_device(one_device, tmp_path, mesh):
  cfg, want = one_device
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  sizes = [f"mesh.{axis}={n}" for axis, n in MESHES[mesh].items()]
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp_path / "run", *sizes, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  shape, got = losses(tmp_path / "run")
  assert shape == MESHES[mesh]  # the run really used this layout of the 8 devices
  assert len(got) == len(want) == 4
  assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
