"""Gemma 2 / Gemma 3 text and per-layer sliding windows: how their config.json is read (transformers v4 and v5
layouts), what is refused, and that each ingredient really switches on. Logits and generation parity with
transformers are in tests/test_decoder_parity.py, export in tests/test_export.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from test_decoder_parity import CASES, GEMMA, MESH, batch_for, save

from jaxtune.config import ModelConfig
from jaxtune.errors import UserError
from jaxtune.models.gemma import GemmaConfig
from jaxtune.weights import pretrained

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# case -> {what is switched off: HF config changes that switch it off}; each must move the logits
SWITCHES = {
    "gemma2_soft_caps": {
        "attention soft cap": {"attn_logit_softcapping": None},
        "final soft cap": {"final_logit_softcapping": None},
        "window on the local layer": {"sliding_window": 64},
        "no window on the global layer": {"layer_types": [LOCAL, LOCAL]},
        "query_pre_attn_scalar scale": {"query_pre_attn_scalar": 8},
    },
    "gemma3_text": {
        "window on the local layer": {"sliding_window": 64},
        "no window on the global layer": {"layer_types": [LOCAL, LOCAL]},
        "local rope base": {"rope_parameters": {LOCAL: {"rope_type": "default", "rope_theta": 1e6},
                                                GLOBAL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}},
        "rope scaling on the global layer": {"rope_parameters": {LOCAL: {"rope_type": "default", "rope_theta": 1e4},
                                                                 GLOBAL: {"rope_type": "default", "rope_theta": 1e6}}},
        "no rope scaling on the local layer": {"rope_parameters": {
            LOCAL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
            GLOBAL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}},
    },
    "qwen2_mixed_windows": {
        "window on layer 1": {"layer_types": [GLOBAL, GLOBAL]},
        "no window on layer 0": {"layer_types": [LOCAL, LOCAL]},
    },
}


@pytest.mark.parametrize("case, attention", [("gemma2_soft_caps", "auto"), ("gemma3_text", "auto"),
                                             ("qwen2_mixed_windows", "auto"), ("gemma2_soft_caps", "splash")])
def test_each_ingredient_switches_on_in_a_scanned_stack(tmp_path, case, attention):
  """Our scanned model matches transformers, and differs from transformers with any one ingredient switched off:
  a per-layer window or rope that the scan lost, or a soft cap that a kernel dropped, would fail here."""
  hf_config, cls = CASES[case]
  ref = save(tmp_path, hf_config, cls)
  model_cfg = ModelConfig(path=str(tmp_path), new_params=(), scan_layers=True, attention=attention)
  model, params = pretrained.from_pretrained(model_cfg, 0, MESH, 0)
  ids = np.random.default_rng(5).integers(0, 99, (2, 24))
  ours = np.asarray(model.apply(params, batch_for(ids, np.ones_like(ids)))["logits"])
  for what, change in [("nothing", {}), *SWITCHES[case].items()]:
    other = cls(type(hf_config).from_dict({**hf_config.to_dict(), **change})).eval()
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
      theirs = other(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    gap = np.abs(ours - theirs).max()
    assert gap <= 1e-4 if what == "nothing" else gap > 1e-2, (what, gap)


def gemma3_v5() -> dict:
  return CASES["gemma3_text"][0].to_dict()


def test_transformers_v4_and_v5_configs_read_alike():
  v5 = gemma3_v5()
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
  v4.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
            sliding_window_pattern=2)  # every 2nd layer global: local, global
  ours = GemmaConfig.from_hf(v5)
  assert GemmaConfig.from_hf(v4) == ours
  assert (ours.layer_types, ours.rope_theta, ours.rope_local_theta) == ((LOCAL, GLOBAL), 1e6, 1e4)
  assert ours.qk_norm and ours.gemma and ours.tie_word_embeddings and ours.attn_logit_softcapping is None
  # Gemma 2 as hub configs of transformers v4 spell it: no layer_types, soft caps at Gemma2Config's defaults
  gemma2 = {"model_type": "gemma2", **{k: v for k, v in GEMMA.items() if k != "initializer_range"},
            "rope_theta": 1e4, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "pad_token_id": 0}
  g2 = GemmaConfig.from_hf(gemma2)
  assert (g2.layer_types, g2.attn_logit_softcapping, g2.final_logit_softcapping) == ((LOCAL, GLOBAL), 50.0, 30.0)
  assert g2 == GemmaConfig.from_hf(transformers.Gemma2Config(**GEMMA).to_dict())
  restored = GemmaConfig(**{**dataclasses.asdict(ours), "layer_types": list(ours.layer_types)})  # as JSON gives it
  assert restored == ours and hash(restored) == hash(ours)


def test_what_is_not_supported_is_refused_with_the_reason():
  with pytest.raises(UserError, match="use_bidirectional_attention .* not supported"):
    GemmaConfig.from_hf({**gemma3_v5(), "use_bidirectional_attention": True})
  local_scaled = {**gemma3_v5(), "rope_parameters": {LOCAL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                                    GLOBAL: {"rope_type": "default", "rope_theta": 1e6}}}
  with pytest.raises(UserError, match="rope type 'linear' on the sliding layers is not supported"):
    GemmaConfig.from_hf(local_scaled)
  with pytest.raises(UserError, match="layer_types .* should name 2 layers"):
    GemmaConfig.from_hf({**gemma3_v5(), "layer_types": [LOCAL, "chunked_attention"]})
  with pytest.raises(UserError, match="model_type 'gemma3' in config.json is not supported"):  # the multimodal one
    pretrained.family_of({"model_type": "gemma3", "text_config": gemma3_v5()})
