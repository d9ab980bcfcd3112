"""A tiny BERT, Llama and T5 trained on 8 simulated devices under each mesh layout match 1 device.

Each layout must give the 1-device losses and final params, and every param (and its Adam moments)
must really be laid out as the rules table says. tests/mesh_run.py trains all runs of a model in one
process per device count, which keeps the compile-heavy part to two processes per model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO, save_tiny_bert, seq2seq_config, with_devices, write_config

# Every layout splits the batch over its data x fsdp devices (pure data=8, all params replicated, adds little);
# tensor parallelism with data parallelism is in data2_fsdp2_tensor2.
MESHES = {"fsdp8": {"data": 1, "fsdp": 8, "tensor": 1}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
RULES = {"embed": None, "mlp": ["fsdp"]}  # the override run: no FSDP on embed, the MLP split over fsdp instead
# LoRA adapters on attention and MLP kernels (Llama's gate/up run as one matmul), the base frozen.
LORA = {"bert": "model.lora.targets=['bert.layers.(query|value|mlp_in).kernel']",
        "llama": "model.lora.targets=['layers.attn.(q|v).kernel','layers.mlp.(gate|up|down).kernel']",
        "t5": None}  # (no T5 LoRA run)
# 8-device run -> (its mesh, extra overrides, the 1-device run it must match)
EIGHT = {**{name: (sizes, [], "one") for name, sizes in MESHES.items()},
         "fsdp8_rules": (MESHES["fsdp8"], [f"mesh.rules={json.dumps(RULES)}"], "one"),
         "data2_fsdp2_tensor2_accum2": (MESHES["data2_fsdp2_tensor2"], ["train.grad_accum=2"], "one_accum2"),
         "data2_fsdp2_tensor2_lora": (MESHES["data2_fsdp2_tensor2"], ["LORA"], "one_lora")}


# Runs whose point does not depend on the model (a rules override, microbatches over the mesh): BERT's only.
BERT_ONLY = {"fsdp8_rules", "data2_fsdp2_tensor2_accum2", "one_accum2"}


# The Llama leaves out pure FSDP (the BERT covers it); the T5 runs the layout that uses all three mesh axes (and its
# 1-device reference) only.
NOT_LLAMA = BERT_ONLY | {"fsdp8"}
T5_ONLY = {"one", "data2_fsdp2_tensor2"}


def runs_for(model: str, runs: dict[str, list[str]]) -> dict[str, list[str]]:
  """The runs of `model`: all for the BERT, the model-specific ones for the Llama, one layout for the T5."""
  return {name: [LORA[model] if o == "LORA" else o for o in overrides] for name, overrides in runs.items()
          if model == "bert" or (model == "llama" and name not in NOT_LLAMA) or (model == "t5" and name in T5_ONLY)}


RUNS_8 = {name: [*(f"mesh.{a}={n}" for a, n in sizes.items()), *extra] for name, (sizes, extra, _) in EIGHT.items()}
RUNS_1 = {"one": [], "one_accum2": ["train.grad_accum=2"], "one_lora": ["LORA"]}

# What the rules table must give a few params (trailing replicated dims left out), written out by hand.
# BERT: word (V, D), query (N, D, H, K), mlp_in (N, D, F), attn_out (N, H, K, D), classifier (D, C).
# Llama: embed (V, D), q (N, D, H, K), k (N, D, G, K), gate (N, D, F), down (N, F, D).
EXPECTED = {
    "bert": {
        "fsdp8": {"bert.embeddings.word": [None, "fsdp"], "bert.layers.query.kernel": [None, "fsdp"],
                  "bert.layers.mlp_in.kernel": [None, "fsdp"],
                  "bert.layers.attn_out.kernel": [None, None, None, "fsdp"], "classifier.kernel": ["fsdp"]},
        "data2_fsdp2_tensor2": {"bert.embeddings.word": ["tensor", "fsdp"],
                                "bert.layers.query.kernel": [None, "fsdp", "tensor"],
                                "bert.layers.mlp_in.kernel": [None, "fsdp", "tensor"],
                                "bert.layers.attn_out.kernel": [None, "tensor", None, "fsdp"],
                                "classifier.kernel": ["fsdp"]},
        "fsdp8_rules": {"bert.embeddings.word": [], "bert.layers.query.kernel": [],
                        "bert.layers.mlp_in.kernel": [None, None, "fsdp"],
                        "bert.layers.mlp_out.kernel": [None, "fsdp"]},
    },
    "llama": {
        "data2_fsdp2_tensor2": {"embed": ["tensor", "fsdp"], "layers.attn.q.kernel": [None, "fsdp", "tensor"],
                                "layers.attn.k.kernel": [None, "fsdp", "tensor"],
                                "layers.mlp.gate.kernel": [None, "fsdp", "tensor"],
                                "layers.mlp.down.kernel": [None, "tensor", "fsdp"]},
    },
    # T5: shared (V, D), position_bias (buckets, H), q (N, D, H, K), o (N, H, K, D), wi_0 (N, D, F); one layout.
    "t5": {
        "data2_fsdp2_tensor2": {"shared": ["tensor", "fsdp"], "decoder.position_bias": [None, "tensor"],
                                "encoder.layers.attn.q.kernel": [None, "fsdp", "tensor"],
                                "decoder.layers.cross_attn.o.kernel": [None, "tensor", None, "fsdp"],
                                "decoder.layers.mlp.wi_0.kernel": [None, "fsdp", "tensor"]},
    },
}


# The logical axes -> mesh axes table as docs/scaling.md states it, written out here (not read from
# sharding.RULES): a param's dim may be split only over the mesh axes its logical axis names.
AS_WRITTEN = {"batch": ["data", "fsdp"], "vocab": ["tensor"], "heads": ["tensor"], "kv_heads": ["tensor"],
              "mlp": ["tensor"], "embed": ["fsdp"]}


def trim(spec):
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return [tuple(a) if isinstance(a, list) else a for a in spec]


def train_all(config_path, out, runs, devices):
  env = {**os.environ, "XLA_FLAGS": with_devices(devices)}
  result = subprocess.run([sys.executable, str(REPO / "tests" / "mesh_run.py"), str(config_path), str(out),
                           json.dumps(runs)], capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  return {name: (json.loads((out / f"{name}.json").read_text()), dict(np.load(out / f"{name}.npz"))) for name in runs}


# The Llama's runs are slow-tier: a Llama-family step on fsdp 4 x tensor 2 is tests/test_family_meshes.py's (seven
# families), and LoRA on it tests/test_preference.py::test_the_step_on_eight_devices_with_fsdp_equals_one_device's.
@pytest.fixture(scope="module", params=["bert", pytest.param("llama", marks=pytest.mark.slow), "t5"])
def trained(request, tmp_path_factory, minilm_dir, tiny_llama_dir, tiny_t5_dir, reviews):
  """model name -> run name -> (record, final params), for the 1-device and the 8-device runs."""
  tmp = tmp_path_factory.mktemp(request.param)
  train = {"batch_size": 16, "eval_batch_size": 16}
  if request.param == "bert":  # dims divisible by 8, so that every rule really shards
    model_dir = save_tiny_bert(tmp / "bert", minilm_dir, intermediate_size=64)
    path = write_config(tmp / "c.yaml", model_dir, reviews, train=train)
  elif request.param == "t5":  # text-to-text: review -> "great" / "other"
    path = seq2seq_config(tmp / "c.yaml", tiny_t5_dir, reviews, train=train)
  else:
    path = write_config(tmp / "c.yaml", tiny_llama_dir, reviews, train=train, model={"new_params": []})
    cfg = yaml.safe_load(path.read_text())
    cfg["task"] = "causal_lm"
    cfg["checkpoint"] = {"best_metric": "loss", "best_mode": "min"}
    del cfg["data"]["label_column"]
    path.write_text(yaml.safe_dump(cfg))
  model = request.param
  runs = {**train_all(path, tmp / "one", runs_for(model, RUNS_1), 1),
          **train_all(path, tmp / "eight", runs_for(model, RUNS_8), 8)}
  return request.param, runs


@pytest.mark.parametrize("run", list(RUNS_8))
def test_layout_matches_one_device(trained, run):
  _, runs = trained
  if run not in runs:
    pytest.skip("not run for this model (see runs_for)")
  sizes, _, reference = EIGHT[run]
  (got, got_params), (want, want_params) = runs[run], runs[reference]
  assert got["mesh"] == sizes and want["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}  # the layouts really used
  assert len(got["losses"]) == len(want["losses"]) == 4
  np.testing.assert_allclose(got["losses"], want["losses"], atol=1e-5, rtol=0)
  assert got_params.keys() == want_params.keys()
  for path in want_params:
    np.testing.assert_allclose(got_params[path], want_params[path], atol=1e-5, rtol=0, err_msg=path)


@pytest.mark.parametrize("run", [*MESHES, "fsdp8_rules", "data2_fsdp2_tensor2_lora"])
def test_params_are_sharded_as_the_rules_say(trained, run):
  model, runs = trained
  if run not in runs:
    pytest.skip("not run for this model (see runs_for)")
  record = runs[run][0]
  allowed = {**AS_WRITTEN, **(RULES if run == "fsdp8_rules" else {})}
  adapters = {path for path in record["params"] if ".lora_" in path}
  assert bool(adapters) == run.endswith("lora")
  for path, p in record["params"].items():
    spec = trim(p["spec"])
    per_dim = [() if a is None else (a if isinstance(a, tuple) else (a,)) for a in spec]
    used = [axis for axes in per_dim for axis in axes]
    assert len(used) == len(set(used)), path  # a mesh axis splits one dim of an array at most
    for dim, logical, axes in zip(p["shape"], p["axes"], per_dim):
      assert set(axes) <= set(allowed.get(logical) or ()), (path, logical, axes)  # only where the table says
      assert dim % np.prod([record["mesh"][a] for a in axes], dtype=int) == 0, (path, dim, axes)
    trains = not adapters or path in adapters or path.startswith("classifier.")  # LoRA freezes the rest
    assert bool(p["moments"]) == trains, path  # frozen params have no Adam moments
    assert all(trim(m) == spec for m in p["moments"]), path  # Adam mu and nu live with their param
  for path, spec in EXPECTED[model][run.removesuffix("_lora")].items():
    assert trim(record["params"][path]["spec"]) == trim(spec), path
  if adapters:  # A (in, rank) is split like the kernel's input dims, B (rank, out) like its outputs
    q = "bert.layers.query" if model == "bert" else "layers.attn.q"
    assert trim(record["params"][f"{q}.lora_a"]["spec"]) == [None, "fsdp"]
    assert trim(record["params"][f"{q}.lora_b"]["spec"]) == [None, None, "tensor"]
  assert any(trim(p["spec"]) for p in record["params"].values())
