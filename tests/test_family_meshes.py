"""The newer decoder families (Qwen3, Qwen2 with sliding windows on every or some layers, Gemma 2 and 3, Qwen3-MoE)
take a sharded train step on 8 simulated devices (fsdp 4 x tensor 2) equal to the one-device step
(tests/family_step.py); the older families are covered by tests/test_meshes.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, with_devices
from family_step import OPT, step_once
from jax.sharding import PartitionSpec as P
from test_decoder_parity import CASES

FAMILIES = ["qwen3_qk_norm", "qwen2_sliding_window", "phi3", "qwen2_mixed_windows", "gemma2_soft_caps", "gemma3_text",
            "qwen3_moe"]


# The default run shards the families whose params or layers bring their own layout (Phi-3's fused projections,
# per-layer window flags, Gemma 3's QK and extra norms and scaled embedding, MoE experts); Qwen3's QK norms, a window on
# every layer and Gemma 2's soft caps (elementwise on the scores) are slow-tier.
FAST = {"phi3", "qwen2_mixed_windows", "gemma3_text", "qwen3_moe"}


@pytest.fixture(scope="module")
def eight_devices(request, tmp_path_factory):
  """{case: (its checkpoint dir, the step on 8 devices)}, every selected case in one subprocess launch."""
  selected = {item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
  paths = {}
  for case in [c for c in FAMILIES if c in selected]:
    hf_config, cls = CASES[case]
    paths[case] = tmp_path_factory.mktemp(case)
    torch.manual_seed(0)
    cls(hf_config).save_pretrained(paths[case])
  env = {**os.environ, "XLA_FLAGS": with_devices(8), "JAX_PLATFORMS": "cpu"}
  pairs = [str(x) for case in paths for x in (paths[case], paths[case] / "step8.npz")]
  done = subprocess.run([sys.executable, str(REPO / "tests" / "family_step.py"), "1", "4", "2", *pairs],
                        env=env, capture_output=True, text=True, timeout=900, cwd=REPO / "tests")
  assert done.returncode == 0, done.stderr[-3000:]
  return {case: (paths[case], dict(np.load(paths[case] / "step8.npz"))) for case in paths}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in FAMILIES])
def test_a_sharded_step_equals_the_one_device_step(eight_devices, case):
  path, sharded = eight_devices[case]
  one = step_once(str(path), 1, 1, 1)
  assert float(sharded["loss"]) == pytest.approx(float(one["loss"]), rel=1e-5)
  assert float(sharded["grad_norm"]) == pytest.approx(float(one["grad_norm"]), rel=1e-5)
  if case == "qwen3_moe":  # the experts whole on each fsdp device (4 of 4), their width over tensor; the aux loss on
    assert str(sharded["spec/layers.mlp.gate"]) == str(P(None, "fsdp", None, "tensor"))
    assert str(sharded["spec/layers.mlp.down"]) == str(P(None, "fsdp", "tensor", None))
    assert float(sharded["aux_loss"]) == pytest.approx(float(one["aux_loss"]), rel=1e-5) and float(one["aux_loss"]) > 0
  params = [k for k in one if k.startswith("param/")]
  for k in params:
    if k.endswith("attn.k.bias"):  # shifts every score of a query alike: its true gradient is 0, and Adam's
      continue                     # first step turns rounding noise into steps (docs/fidelity.md, BERT's key bias)
    # Adam's first step is lr g / (|g| + eps), a full lr where |g| >> eps; where |g| is within 100 eps of 0 (a rare
    # token's row, a near-cancelling weight) the step's size follows the float noise of g, to 1e-4 here
    full = np.abs(one[k] - one[k.replace("param/", "before/")]) > 0.99 * OPT.lr
    np.testing.assert_allclose(sharded[k][full], one[k][full], rtol=0, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(sharded[k], one[k], rtol=0, atol=1e-4, err_msg=k)
  split = [k for k in params if sharded[k.replace("param/", "split/")]]
  assert len(split) >= len(params) // 2, split  # the kernels and embeddings really are spread over the devices
