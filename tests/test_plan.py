"""scripts/plan.py on a tiny random Llama: a v5e:2x2 slice compiled on this host (libtpu's compile-only devices), and
the analytic GPU mode; memory parts add up, the FLOPs match a hand count, a run that cannot fit gets a change that does.
"""

from __future__ import annotations

import json
import math

import jax
import pytest
import yaml

from conftest import REPO, run_script
from jaxtune import config
from jaxtune.tools import plan
from jaxtune.train import estimate as plan_estimate

TOPOLOGY = "v5e:2x2"


def tpu_compile_available() -> None:
  """Skips the calling test where libtpu (pip install 'jaxtune[tpu-compile]') cannot describe a TPU slice."""
  pytest.importorskip("libtpu", reason="TPU compiles need libtpu: pip install 'jaxtune[tpu-compile]'")


@pytest.fixture(scope="module")
def tiny_plan_config(tmp_path_factory, tiny_llama_dir):
  path = tmp_path_factory.mktemp("plan") / "tiny.yaml"
  path.write_text(yaml.safe_dump({
      "task": "causal_lm", "model": {"path": str(tiny_llama_dir), "new_params": [], "compute_dtype": "bfloat16"},
      "data": {"train": "unused.txt", "text_column": "text", "max_len": 128},
      "mesh": {"data": 1, "fsdp": -1}, "train": {"batch_size": 8}}))
  return path


@pytest.fixture(scope="module")
def tiny_tpu_plan(tiny_plan_config, tmp_path_factory):
  """The script's JSON and text for the tiny Llama on v5e:2x2 (one compile, through the command line)."""
  tpu_compile_available()
  out = tmp_path_factory.mktemp("plan_out") / "plan.json"
  proc = run_script("plan.py", "--config", str(tiny_plan_config), "--topology", TOPOLOGY, "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_tpu_plan_memory_adds_up_and_fits(tiny_tpu_plan):
  result, text = tiny_tpu_plan
  memory = result["memory_per_device_bytes"]
  assert result["devices"] == 4 and result["chip"] == "TPU v5 lite" and result["mesh"]["fsdp"] == 4
  assert result["devices_used"]["kind"] == "TPU v5 lite" and result["devices_used"]["count"] == 4
  for part in ("params", "optimizer", "total"):
    assert memory[part] > 0, (part, memory)
  assert memory["temporaries"] >= 0  # hidden 32: XLA keeps every temporary of this step in fusions, none in HBM
  assert memory["frozen_params"] == 0
  assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
  # AdamW's two moments are shaped and sharded like the params (plus a step count or two)
  assert 2 * memory["params"] <= memory["optimizer"] <= 2 * memory["params"] + 64
  assert result["fits"] and result["suggestion"] is None and result["verdict"].startswith("fits")
  assert "XLA buffer assignment" in result["memory_source"] and result["compile_s"] > 0
  assert "verdict: fits" in text and "memory per device" in text and "tokens/s" in text
  assert result["splash_kernel_calls"] > 0  # model.attention auto: splash on the slice's TPUs


def test_tpu_plan_compiled_params_match_their_shardings(tiny_tpu_plan, tiny_plan_config):
  """The compiled step's params per device are what the model's shardings give (the fsdp split of each leaf)."""
  result, _ = tiny_tpu_plan
  cfg = config.load(tiny_plan_config)
  hf = plan.read_hf_config(cfg, None)
  model, mesh_shape = plan.analytic_build(hf, 4, 2)(cfg)
  assert plan_estimate.state_bytes(model, mesh_shape)["params"] == result["memory_per_device_bytes"]["params"]


def test_flops_per_step_match_a_hand_count(tiny_plan_config, tiny_llama_dir):
  """6 N + 12 layers L H K per token for full fine-tuning; LoRA's frozen base counts 4 N, its adapters 6 each."""
  d, f, layers, heads, head_dim, kv, vocab = 32, 48, 2, 4, 8, 2, 49152  # conftest.tiny_llama_dir
  batch, length = 8, 128
  n = layers * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * f) + d * vocab
  attention = 12 * layers * length * heads * head_dim
  cfg = config.load(tiny_plan_config)
  hf = plan.read_hf_config(cfg, None)
  model, _ = plan.analytic_build(hf, 4, 2)(cfg)
  flops, how = plan_estimate.flops_per_step(cfg, model)
  assert flops == (6 * n + attention) * batch * length and "6 x" in how

  rank = 4
  cfg = config.load(tiny_plan_config, [f"model.lora.rank={rank}", r"model.lora.targets=['layers\.attn\.q\.kernel']"])
  model, _ = plan.analytic_build(hf, 4, 2)(cfg)
  adapters = layers * rank * (d + heads * head_dim)  # A: D x r, B: r x (H K) per layer
  flops, how = plan_estimate.flops_per_step(cfg, model)
  assert flops == pytest.approx((4 * n + 6 * adapters + attention) * batch * length) and "4 x" in how


def test_a_huge_batch_does_not_fit_and_microbatches_would(tiny_plan_config):
  """Too many tokens per device for a v5e's 16 GiB: the verdict says so and names train.grad_accum."""
  tpu_compile_available()
  cfg = config.load(tiny_plan_config, ["train.batch_size=4096", "train.loss_vocab_block=0"])  # full logits: too big
  result = plan.plan(cfg, plan.read_hf_config(cfg, None), plan.tpu_target(TOPOLOGY))
  assert not result["fits"] and result["hbm_share"] > 1
  memory = result["memory_per_device_bytes"]
  assert memory["temporaries"] > memory["params"] + memory["optimizer"] > 0  # the activations of 1024 rows
  assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
  suggestion = result["suggestion"]
  assert suggestion is not None and any(o.startswith("train.grad_accum=") for o in suggestion["overrides"])
  assert suggestion["estimated_total_bytes"] <= result["hbm_per_device_bytes"]
  assert "does not fit" in result["verdict"] and "train.grad_accum=" in result["verdict"]


def test_gpu_plan_is_an_estimate(tiny_plan_config, tmp_path):
  out = tmp_path / "plan.json"
  proc = run_script("plan.py", "--config", str(tiny_plan_config), "--gpu", "h100", "--num-devices", "4",
                    "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert "ESTIMATE" in result["memory_source"] and "estimate" in proc.stdout.lower()
  assert result["chip"] == "NVIDIA H100" and result["peak_flops_per_device"] == 989e12
  memory = result["memory_per_device_bytes"]
  assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
  assert result["fits"] and "compile_s" not in result


def test_gpu_plan_with_no_room_says_what_to_do(tiny_plan_config):
  """With almost no HBM no change fits: the verdict says to use more devices."""
  cfg = config.load(tiny_plan_config)
  result = plan.plan(cfg, plan.read_hf_config(cfg, None), plan.gpu_target("h100", 4, hbm_gib=1e-4))
  assert not result["fits"] and result["suggestion"] is None and "more devices" in result["verdict"]
  step = result["compute"]["step_s"]
  assert step == pytest.approx(result["compute"]["flops_per_step"] / (4 * 989e12 * 0.4))


def test_shipped_llama_shapes_plan_offline():
  """configs/hf/ holds the Llama 3 shapes that the pod configs plan with (their hub ids cannot be read offline)."""
  cfg = config.load(REPO / "configs" / "llama3_pod.yaml")
  hf = plan.read_hf_config(cfg, str(REPO / "configs" / "hf" / "llama-3.2-1b.json"))
  model, _ = plan.analytic_build(hf, 16, 2)(cfg)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(model.abstract))
  assert 1.23e9 < params < 1.24e9  # Llama-3.2-1B: 1,235,814,400 params, embeddings tied


def test_large_model_tables_rank_the_methods_as_their_bytes_say():
  """plan_tables (docs/large_models.md) on the GPU cells, which need no compile: Llama-3.1-8B on one H200 holds
  16 bytes per param fully fine-tuned, 2 per base param as LoRA on bfloat16 and ~0.53 as QLoRA on NF4 (plus the
  bfloat16 embeddings and head); the 70B model's NF4 base fits one H200 where its bfloat16 base cannot."""
  from jaxtune.tools import plan_tables

  cells = {(c.model, c.method): c.result
           for c in plan_tables.run(list(plan_tables.MODELS), list(plan_tables.METHODS), ["1 x H200"], log=lambda _: 0)}
  memory = {k: r["memory_per_device_bytes"] for k, r in cells.items()}
  full = memory["Llama-3.1-8B", "full"]
  assert full["params"] + full["optimizer"] + full["gradients"] == pytest.approx(16 * 8.03e9, rel=0.01)
  bf16, nf4 = memory["Llama-3.1-8B", "LoRA bf16"], memory["Llama-3.1-8B", "QLoRA NF4"]
  assert bf16["frozen_params"] == pytest.approx(2 * 8.03e9, rel=0.01)
  layers = 32 * (4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336)  # the quantised kernels
  rest = 8.03e9 - layers  # embeddings, head, norms: bfloat16
  want = layers * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4 * 32 * 7 + 2 * rest  # + one float32 offset per kernel
  assert nf4["frozen_params"] == pytest.approx(want, rel=1e-3)
  assert not cells["Llama-3.1-70B", "LoRA bf16"]["fits"] and cells["Llama-3.1-70B", "QLoRA NF4"]["fits"]
  assert "| Llama-3.1-70B | QLoRA NF4 | 1 x H200 |" in plan_tables.markdown(
      [plan_tables.Cell(m, k, "1 x H200", r) for (m, k), r in cells.items()])
  assert plan_tables.max_context("Llama-3.1-8B", "QLoRA NF4", 80) > plan_tables.max_context(
      "Llama-3.1-8B", "QLoRA NF4", 48) > 0
