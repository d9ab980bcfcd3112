"""Weights read shard by shard: on 8 simulated devices every param equals the eager HF -> ours conversion bit for
bit, each device's shard is read from its own slice (no tensor read whole, every byte read once); a sharded
index naming a missing file is one UserError; GGUF reads dequantise just the rows asked for, and the loadmem
benchmark's GGUF file loads equal to its safetensors checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, with_devices

from jaxtune.errors import UserError
from jaxtune.tools import loadmem
from jaxtune.weights import gguf as jgguf
from jaxtune.weights import hf

TINY = {**loadmem.LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}

# Runs with 8 devices: loads the checkpoint under two meshes and checks every param against the eager conversion.
CHILD = r"""
import json, sys
import numpy as np
from safetensors.numpy import load_file
from jaxtune import params as params_lib, sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.models import FAMILIES
from jaxtune.weights import hf, pretrained

model_dir = sys.argv[1]
raw = {}
for name in set(json.load(open(f"{model_dir}/{hf.INDEX}"))["weight_map"].values()):
  raw.update(load_file(f"{model_dir}/{name}"))
report = {}
for name, sizes in {"fsdp8": dict(data=1, fsdp=8), "2x2x2": dict(data=2, fsdp=2, tensor=2)}.items():
  mesh = sharding.make_mesh(MeshConfig(**sizes))
  model_cfg = ModelConfig(path=model_dir)
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 2, mesh, head="causal_lm")
  reads = []
  def counted(key, index, read=reader.read):
    out = read(key, index)
    reads.append((key, out.nbytes))
    return out
  reader.read = counted
  reader.bytes_read = 0
  params = params_lib.flatten(pretrained.load_params(model, model_cfg, reader, seed=0))
  param_map = FAMILIES[model.family].param_map(model.cfg)
  for path, (key, kind) in param_map.items():
    got, want_shape = np.asarray(params[path]), params[path].shape
    lead = hf.stacked_dims(key)
    if lead:  # the old eager path: whole tensors, converted, stacked
      want = np.stack([hf.to_ours(raw[k], kind, want_shape[lead:])
                       for k in hf.layer_keys(key, want_shape)]).reshape(want_shape)
    else:
      want = hf.to_ours(raw[key], kind, want_shape)
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, path)
    assert len(params[path].sharding.device_set) == 8
  whole = sorted({k for k, n in reads if n >= raw[k].nbytes})
  report[name] = {"bytes_read": reader.bytes_read, "whole": whole, "reads": len(reads),
                  "checked": len(param_map), "specs": {p: str(x.sharding.spec) for p, x in params.items()}}
print(json.dumps(report))
"""


def write_phi3(out) -> int:
  """A random Phi-3 of TINY's sizes (q, k, v in one qkv_proj, gate and up in one gate_up_proj) in several safetensors
  files; its bytes."""
  import torch
  import transformers

  torch.manual_seed(0)
  sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size")
  cfg = transformers.Phi3Config(**{k: TINY[k] for k in sizes}, pad_token_id=0, eos_token_id=2)
  transformers.Phi3ForCausalLM(cfg).save_pretrained(out, max_shard_size="200KB")
  reader = hf.SafetensorsReader(out)
  return sum(4 * int(np.prod(reader.shape(key))) for key in reader.keys())


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_sharded_load_reads_each_slice_once_and_equals_the_eager_import(tmp_path, family):
  """Phi-3's fused tensors too: each of q, k, v (gate, up) reads its own slices of its rows, none the whole tensor."""
  if family == "llama":
    total = loadmem.write_checkpoint(tmp_path / "ckpt", TINY, files=3)
  else:
    total = write_phi3(tmp_path / "ckpt")
  assert len(set(json.loads((tmp_path / "ckpt" / hf.INDEX).read_text())["weight_map"].values())) > 1
  env = {**os.environ, "XLA_FLAGS": with_devices(8), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt")], env=env, capture_output=True,
                        text=True, cwd=REPO, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, r in report.items():
    # Every param is split on some mesh axis, and each slice maps onto one contiguous run of its HF axis:
    # so no tensor is read whole, and the shards that devices share (the data axis) are read once.
    assert r["whole"] == [], (name, r["whole"])
    assert r["bytes_read"] == total, (name, r["bytes_read"], total)
  assert report["2x2x2"]["specs"]["layers.attn.q.kernel"] == "P(None, 'fsdp', 'tensor', None)"


def test_index_naming_a_missing_file_is_one_user_error(tmp_path):
  loadmem.write_checkpoint(tmp_path, TINY, files=3)
  (tmp_path / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(UserError, match=r"model\.safetensors\.index\.json lists 1 file.*model-00002-of-00003"
                                      r"\.safetensors.*download every file"):
    hf.SafetensorsReader(tmp_path)


def test_reader_slices_equal_the_whole_tensor_and_count_their_bytes(tmp_path):
  loadmem.write_checkpoint(tmp_path, TINY, files=2)
  reader = hf.SafetensorsReader(tmp_path)
  key = "model.layers.1.mlp.down_proj.weight"
  whole = reader.get(key)
  assert reader.bytes_read == whole.nbytes and whole.shape == reader.shape(key) == (64, 128)
  np.testing.assert_array_equal(reader.read(key, (slice(3, 40), slice(16, 32))), whole[3:40, 16:32])
  assert reader.bytes_read == whole.nbytes + 37 * 16 * 4


def test_truncated_safetensors_file_is_a_user_error(tmp_path):
  loadmem.write_checkpoint(tmp_path, TINY, files=1)
  path = tmp_path / "model-00001-of-00001.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(UserError, match="not a readable safetensors file"):
    hf.SafetensorsReader(tmp_path)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight",
                                 "model.layers.1.mlp.up_proj.weight", "model.norm.weight"])
def test_gguf_row_slices_equal_the_whole_dequantised_tensor(key):
  reader = jgguf.GGUFReader(jgguf.find_packaged_smollm2())
  whole = reader.get(key)
  rows = slice(37, 101)  # not aligned to a head (64 rows) nor a quantisation block
  np.testing.assert_array_equal(reader.read(key, (rows,)), whole[rows])
  if whole.ndim == 2:
    np.testing.assert_array_equal(reader.read(key, (rows, slice(32, 96))), whole[rows, 32:96])


# Loads the safetensors directory and the GGUF file of one seed under fsdp=8: every param bit for bit the same.
GGUF_CHILD = r"""
import json, sys
import numpy as np
from jaxtune import params as params_lib, sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.weights import pretrained

mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=8))
loaded = []
for path in sys.argv[1:]:
  model_cfg = ModelConfig(path=path)
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 2, mesh, head="causal_lm")
  loaded.append((hf_config, params_lib.flatten(pretrained.load_params(model, model_cfg, reader, seed=0))))
(st_cfg, st), (gg_cfg, gg) = loaded
differ = [p for p in st if not np.array_equal(np.asarray(st[p]).view(np.uint32), np.asarray(gg[p]).view(np.uint32))
          or st[p].sharding != gg[p].sharding]
print(json.dumps({"params": len(st), "same_keys": sorted(st) == sorted(gg), "differ": differ,
                  "config_differs": sorted(k for k in st_cfg if st_cfg[k] != gg_cfg.get(k))}))
"""


def test_benchmark_gguf_file_loads_equal_to_its_safetensors_checkpoint(tmp_path):
  total = loadmem.write_checkpoint(tmp_path / "ckpt", TINY, files=2, seed=3)
  assert loadmem.write_gguf(tmp_path / "model.gguf", TINY, seed=3) == total
  assert jgguf.GGUFReader(tmp_path / "model.gguf").hf_config() == TINY
  env = {**os.environ, "XLA_FLAGS": with_devices(8), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", GGUF_CHILD, str(tmp_path / "ckpt"), str(tmp_path / "model.gguf")],
                        env=env, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["same_keys"] and report["params"] > 5 and report["differ"] == [] and report["config_differs"] == []
