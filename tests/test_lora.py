"""LoRA and frozen params: what trains, what is stored, and that exports (merged and PEFT) give our logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from conftest import export_run, records, run_script, write_config
from test_export import decoder_batch, load_exported

from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import LoraConfig, MeshConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
from jaxtune.models import model as model_lib
from jaxtune.train import loop, restore, setup
from jaxtune.weights import peft as peft_export
from jaxtune.weights import pretrained

MESH = sharding.make_mesh(MeshConfig())
BERT_TARGETS = [r"bert\.layers\.(query|value|mlp_in)\.kernel"]
LLAMA_TARGETS = [r"layers\.attn\.(q|k|v|o)\.kernel", r"layers\.mlp\.(gate|up|down)\.kernel"]


def flat_host(tree) -> dict[str, np.ndarray]:
  return {p: np.asarray(a) for p, a in params_lib.flatten(jax.device_get(tree)).items()}


def every_param(state) -> dict[str, np.ndarray]:
  """The trained and the frozen params of a train state, flat on the host."""
  return flat_host(params_lib.merge(state.params, state.frozen))


def fit_run(tmp_path, model_dir, reviews, model: dict, steps: int = 4, overrides: tuple[str, ...] = (), **train_cfg):
  """Trains a tiny classification run in process: (prepared run, initial flat params, final state)."""
  tmp_path.mkdir(parents=True, exist_ok=True)
  cfg = config_lib.load(write_config(tmp_path / "c.yaml", model_dir, reviews, model=model),
                        [f"train.max_steps={steps}", *(f"train.{k}={v}" for k, v in train_cfg.items()), *overrides])
  run = setup.prepare(cfg, tmp_path / "run")
  initial = every_param(run.state)
  state, _, _ = loop.loop(run)
  run.ckpts.wait()
  run.ckpts.close()
  run.lock.release()
  return run, initial, state


def lora_model(model_dir) -> dict:
  return {"path": str(model_dir),
          "lora": {"targets": BERT_TARGETS, "rank": 4, "alpha": 32, "dropout": 0.1, "train": [r"bert\.pooler\..*"]}}


LARGE_STEP = ("optim.lr=0.02",)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert_dir, reviews):
  """4 steps of LoRA (rank 4, dropout 0.1) on the tiny BERT's query, value and mlp_in, pooler trained too.

  A large step (lr 0.02, alpha / rank = 8) moves the adapters far enough that the exports' logit checks
  below would see an adapter lost or misplaced."""
  tmp = tmp_path_factory.mktemp("lora_run")
  run, initial, state = fit_run(tmp, tiny_bert_dir, reviews, lora_model(tiny_bert_dir), overrides=LARGE_STEP)
  return tmp / "run", run, initial, state


def test_lora_trains_only_adapters_head_and_listed(lora_run):
  run_dir, run, initial, state = lora_run
  final = every_param(state)
  trainable = {p for p in final if p not in run.model.frozen}
  assert set(flat_host(state.params)) == trainable and set(flat_host(state.frozen)) == run.model.frozen
  assert trainable == {f"bert.layers.{m}.lora_{ab}" for m in ("query", "value", "mlp_in") for ab in "ab"} | {
      "bert.pooler.kernel", "bert.pooler.bias", "classifier.kernel", "classifier.bias"}
  for path in run.model.frozen:  # bitwise: not even a rounding step went through them
    np.testing.assert_array_equal(final[path], initial[path], err_msg=path)
  for path in trainable:
    assert not np.array_equal(final[path], initial[path]), path
  assert not np.any(initial["bert.layers.query.lora_b"])  # B starts at zero: the pretrained function
  # Frozen params have no optimiser state: every moment tree holds exactly the trainable paths.
  mu = state.opt_state[1][0].mu
  assert set(params_lib.flatten(mu)) == trainable
  start = next(r for r in records(run_dir) if r.get("event") == "start")
  assert start["trainable_params"] == sum(final[p].size for p in trainable)
  assert start["total_params"] == sum(a.size for a in final.values())
  assert start["optimizer_state_bytes"] == 2 * 4 * start["trainable_params"] + 4 + 4  # mu, nu; two counts


def test_checkpoint_holds_only_trainable_and_restores_onto_base(lora_run, tiny_bert_dir):
  run_dir, run, _, state = lora_run
  saved = ocp.StandardCheckpointer().metadata(run_dir / "checkpoints" / "4" / "params").item_metadata.tree
  assert set(params_lib.flatten(saved)) == {p for p in run.model.axes if p not in run.model.frozen}
  _, model, params, step = restore.restore_step(run_dir, "latest", MESH)  # frozen params from the base dir
  assert step == 4 and model.frozen == run.model.frozen
  want = every_param(state)
  got = flat_host(params)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def bert_inputs(tokenizer_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  enc = tokenizer(["great coffee, would buy again", "the box arrived crushed and the taste was stale"],
                  padding=True, return_tensors="np")  # the shorter row is padded
  batch = {"input_ids": jnp.asarray(enc["input_ids"]), "attention_mask": jnp.asarray(enc["attention_mask"]),
           "token_type_ids": jnp.asarray(enc["token_type_ids"])}
  return batch, {k: torch.from_numpy(v).long() for k, v in enc.items()}


def test_merged_and_peft_exports_give_adapter_logits(lora_run, tiny_bert_dir, tmp_path):
  run_dir, _, _, _ = lora_run
  _, model, params, _ = restore.restore_step(run_dir, "latest", MESH)
  batch, inputs = bert_inputs(tiny_bert_dir)
  ours = np.asarray(model.apply(params, batch)["logits"])
  # Our forward on the merged kernels (no adapters) equals the adapter forward.
  plain = model_lib.describe(model.family, model.cfg, MESH, hf_config=model.hf_config)
  merged = peft_export.merged(flat_host(params), model.lora)
  assert set(merged) == set(plain.axes)
  np.testing.assert_allclose(np.asarray(plain.apply(params_lib.unflatten(merged), batch)["logits"]), ours, atol=1e-5)
  export_run(run_dir, "latest", tmp_path / "hf")
  hf = load_exported(tmp_path / "hf", transformers.BertForSequenceClassification)
  with torch.no_grad():
    np.testing.assert_allclose(hf(**inputs).logits.numpy(), ours, atol=1e-4)
  out = run_script("export_hf.py", "--checkpoint", run_dir, "--output", tmp_path / "peft", "--peft")
  assert out.returncode == 0, out.stderr
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"] and config["r"] == 4
  base = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
  with torch.no_grad():
    theirs = with_adapter(**inputs).logits.numpy()
  assert np.abs(theirs - ours).max() <= 1e-4
  no_adapters = {p: np.zeros_like(v) if p.endswith("lora_b") else v for p, v in flat_host(params).items()}
  without = np.asarray(model.apply(params_lib.unflatten(no_adapters), batch)["logits"])
  assert np.abs(without - ours).max() > 5e-4  # 5x the tolerance: the adapters' share is checked too


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("tiny_gpt2")
  transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       pad_token_id=0)).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def tiny_phi3_dir(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("tiny_phi3")
  transformers.Phi3ForCausalLM(transformers.Phi3Config(
      vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, pad_token_id=0, eos_token_id=2)).save_pretrained(path)
  return path


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_decoder_adapters_on_every_projection_match_peft(name, tiny_llama_dir, tiny_gpt2_dir, tiny_phi3_dir):
  """Adapters on every projection: Llama's key/value and gate/up pairs run as one matmul; GPT-2's fused
  c_attn and its Conv1D layout (PEFT's fan_in_fan_out). Phi-3's q and v (not k) become one adapter of rank 2 x 3 on
  its fused qkv_proj, and up (not gate) one of rank 3 on gate_up_proj, zero rows for the pieces without one."""
  model_dir, targets, per_layer, cls = {
      "llama": (tiny_llama_dir, LLAMA_TARGETS, 7, transformers.LlamaForCausalLM),
      "gpt2": (tiny_gpt2_dir, [r"blocks\.(qkv|attn_out|mlp_in|mlp_out)\.kernel"], 4, transformers.GPT2LMHeadModel),
      "phi3": (tiny_phi3_dir, [r"layers\.attn\.(q|v|o)\.kernel", r"layers\.mlp\.(up|down)\.kernel"], 4,
               transformers.Phi3ForCausalLM),
  }[name]
  model_cfg = ModelConfig(path=str(model_dir), new_params=(), lora=LoraConfig(targets=tuple(targets), rank=3,
                                                                              alpha=5.0))
  model, params = pretrained.from_pretrained(model_cfg, 0, MESH, 0)
  flat = flat_host(params)
  rng = np.random.default_rng(0)
  for path in flat:
    if path.endswith(".lora_b"):  # trained adapters: B away from its zero start
      flat[path] = rng.normal(0, 0.3, flat[path].shape).astype(np.float32)
  ids, mask, batch = decoder_batch(model.cfg.vocab_size)
  ours = np.asarray(model.apply(params_lib.unflatten(flat), batch)["logits"])
  family = FAMILIES[model.family]
  adapter_config, tensors = peft_export.peft_adapter(flat, family.param_map(model.cfg), model.frozen, model_cfg,
                                              "causal_lm", fan_in_fan_out=name == "gpt2")
  assert len(adapter_config["target_modules"]) == per_layer * 2  # both tiny models have 2 layers
  assert adapter_config["modules_to_save"] == []  # a causal LM under LoRA trains nothing else
  if name == "phi3":
    assert adapter_config["rank_pattern"] == {r"model\.layers\.\d+\.self_attn\.qkv_proj": 6,
                                              r"model\.layers\.\d+\.mlp\.gate_up_proj": 3}
  base = cls.from_pretrained(model_dir).eval()
  inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
  with torch.no_grad():
    before = base(**inputs).logits.numpy()
  out = model_dir.parent / f"{name}_peft"
  out.mkdir(exist_ok=True)
  peft_export.write_peft(out, adapter_config, tensors)
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, out).eval()(**inputs).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(theirs - ours)[real].max() <= 1e-4
  assert np.abs(before - ours)[real].max() > 1e-2  # the adapters changed the function, so the match means something
  merged = peft_export.merged(flat, model.lora)
  plain = model_lib.describe(model.family, model.cfg, MESH, hf_config=model.hf_config)
  np.testing.assert_allclose(np.asarray(plain.apply(params_lib.unflatten(merged), batch)["logits"])[real], ours[real],
                             atol=1e-4)


def test_freeze_without_lora_and_grad_accum(tmp_path, tiny_bert_dir, reviews):
  """model.freeze alone: the embeddings and layer norms stay bitwise, the rest trains (in 2 microbatches)."""
  freeze = [r"bert\.embeddings\..*", r".*norm\..*"]
  run, initial, state = fit_run(tmp_path, tiny_bert_dir, reviews, {"path": str(tiny_bert_dir), "freeze": freeze},
                                steps=2, grad_accum=2)
  final = every_param(state)
  assert run.model.frozen == {p for p in final if p.startswith("bert.embeddings.") or "norm." in p}
  for path in final:
    assert np.array_equal(final[path], initial[path]) == (path in run.model.frozen), path
  assert not set(params_lib.flatten(state.opt_state[1][0].nu)) & run.model.frozen


def test_lora_resume_is_exact(lora_run, tmp_path, tiny_bert_dir, reviews):
  """Stopped at step 2 and resumed (--extend), frozen params come from the base dir: equal to 4 steps at once."""
  _, _, _, whole = lora_run
  model = lora_model(tiny_bert_dir)
  fit_run(tmp_path, tiny_bert_dir, reviews, model, steps=2, overrides=LARGE_STEP)
  cfg = config_lib.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, model=model),
                        ["train.max_steps=4", *LARGE_STEP])
  run = setup.prepare(cfg, tmp_path / "run", resume=True, extend=True)
  state, _, _ = loop.loop(run)
  run.ckpts.wait()
  run.ckpts.close()
  run.lock.release()
  a, b = every_param(whole), every_param(state)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg=path)


@pytest.mark.parametrize("model, message", [
    ({"lora": {"targets": [r"nothing\.here"]}}, "matches no param"),
    ({"lora": {"targets": [r"bert\.layers\.query\.bias"]}}, "is not a Dense kernel"),
    ({"freeze": [r"bert\.nope\..*"]}, "config key model.freeze entry"),
    ({"freeze": [".*"]}, "nothing would train"),
    ({"lora": {"targets": [r"bert\.layers\.query\.kernel"], "train": ["pool"]}}, "config key model.lora.train"),
])
def test_bad_lora_and_freeze_configs(tiny_bert_dir, model, message):
  model_cfg = config_lib.from_dict(ModelConfig, {"path": str(tiny_bert_dir), **model})
  hf_config, _ = pretrained.open_checkpoint(model_cfg)
  with pytest.raises(UserError, match=message):
    pretrained.from_config(hf_config, model_cfg, 2, MESH)


def test_lora_config_checks():
  with pytest.raises(UserError, match="model.lora.rank"):
    LoraConfig(targets=("x",), rank=0)
  with pytest.raises(UserError, match="model.lora.dropout"):
    LoraConfig(targets=("x",), dropout=1.0)
