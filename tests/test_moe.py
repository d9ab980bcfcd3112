"""Qwen3-MoE and Mixtral beyond their logits (tests/test_decoder_parity.py): the train loss with transformers'
load-balancing loss, how their config.json is read, and the configs that are refused."""

from __future__ import annotations

import pytest
import torch
from family_step import lm_batch, step_once
from test_decoder_parity import CASES, save

from jaxtune.errors import UserError
from jaxtune.models.llama import LlamaConfig


def test_train_loss_is_transformers_loss_with_the_load_balancing_loss(tmp_path):
  """A train step's loss is transformers' outputs.loss with labels and output_router_logits: the mean cross-entropy
  plus router_aux_loss_coef x load_balancing_loss_func over both layers' routing of the real (unpadded) tokens."""
  hf_config, cls = CASES["qwen3_moe"]
  ref = save(tmp_path, hf_config, cls)
  ours = step_once(str(tmp_path), 1, 1, 1)
  batch = lm_batch()
  ids, mask = torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(batch["segment_ids"]).long()
  assert (mask == 0).any()  # padding, which the aux loss must leave out
  with torch.no_grad():
    theirs = ref(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=True)
  aux = hf_config.router_aux_loss_coef * theirs.aux_loss.item()
  assert float(ours["aux_loss"]) == pytest.approx(aux, rel=1e-5)
  assert float(ours["loss"]) == pytest.approx(theirs.loss.item(), rel=1e-5)
  assert aux > 0.1  # 2 at balance, x 0.1: the cross-entropy alone would miss transformers' loss by that much


def test_config_reading():
  qwen = LlamaConfig.from_hf(CASES["qwen3_moe"][0].to_dict())
  assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.norm_topk_prob, qwen.qk_norm,
          qwen.output_router_logits, qwen.router_aux_loss_coef) == (4, 2, 16, False, True, True, 0.1)
  mixtral = LlamaConfig.from_hf(CASES["mixtral"][0].to_dict())  # always renormalised; experts intermediate_size wide
  assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob, mixtral.qk_norm) == (
      4, 16, True, False)
  # Qwen3-MoE has no max_window_layers: with use_sliding_window every layer slides
  sliding = LlamaConfig.from_hf({**CASES["qwen3_moe"][0].to_dict(), "use_sliding_window": True, "sliding_window": 7})
  assert (sliding.sliding_window, sliding.layer_types) == (7, None)
  dense = LlamaConfig.from_hf({**CASES["qwen3_moe"][0].to_dict(), "num_local_experts": 0})  # HF's Qwen3MoeMLP
  assert (dense.num_experts, dense.qk_norm) == (0, True)


@pytest.mark.parametrize("change, message", [
    ({"mlp_only_layers": [1]}, r"qwen3_moe with dense MLPs on layers \[1\] \(mlp_only_layers \[1\], "
                               r"decoder_sparse_step 1\) is not supported: jaxtune's layer stack needs every layer"),
    ({"decoder_sparse_step": 2}, r"dense MLPs on layers \[0\] \(mlp_only_layers \[\], decoder_sparse_step 2\)"),
    ({"num_experts_per_tok": 5}, r"qwen3_moe num_experts_per_tok 5 should be between 1 and the 4 experts"),
])
def test_qwen3_moe_configs_jaxtune_cannot_run_are_refused(change, message):
  with pytest.raises(UserError, match=message):
    LlamaConfig.from_hf({**CASES["qwen3_moe"][0].to_dict(), **change})


def test_mixtral_router_jitter_is_refused():
  with pytest.raises(UserError, match=r"mixtral router_jitter_noise 0.1 \(training noise on the router's input\) is "
                                      r"not supported; set it to 0.0 in config.json"):
    LlamaConfig.from_hf({**CASES["mixtral"][0].to_dict(), "router_jitter_noise": 0.1})
