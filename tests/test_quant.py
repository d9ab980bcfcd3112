"""Quantised frozen bases (models/quant.py): NF4 and int8 against bitsandbytes' reference, and QLoRA training on them.

The reference is bitsandbytes 0.50's pure-PyTorch CPU path (bitsandbytes/backends/default/ops.py: quantize_4bit,
quantize_blockwise, their dequantisations; functional.py: create_normal_map, create_dynamic_map and the double
quantisation in quantize_4bit), restated here in torch because bitsandbytes is not a dependency.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import REPO, with_devices
from test_export import decoder_batch, load_exported

from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import LoraConfig, MeshConfig, ModelConfig, OptimConfig
from jaxtune.data import batching
from jaxtune.errors import UserError
from jaxtune.models import quant
from jaxtune.tasks import TASKS
from jaxtune.train import estimate, fit, optim, steps
from jaxtune.weights import export, pretrained

LM = TASKS["causal_lm"]

# bitsandbytes/backends/utils.py _NF4_QUANT_TABLE, as published (and the QLoRA paper's appendix E).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def bnb_normal_map(offset: float = 0.9677083) -> torch.Tensor:
  """bitsandbytes.functional.create_normal_map(offset, use_extra_value=True): its first 16 levels."""
  from scipy.stats import norm
  v1 = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]).tolist()
  v3 = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
  values = torch.Tensor(v1 + [0] * (256 - 15) + v3).sort().values
  values /= values.max()
  nonzero = values[values != 0]
  return torch.cat([nonzero[nonzero < 0], torch.zeros(1), nonzero[nonzero > 0]])


def bnb_dynamic_map() -> torch.Tensor:
  """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
  data = []
  for i in range(7):
    boundaries = torch.linspace(0.1, 1, int(2 ** i + 1), dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    data += ((10 ** (-6 + i)) * means).tolist()
    data += (-(10 ** (-6 + i)) * means).tolist()
  data += [0, 1.0]
  data.sort()
  return torch.tensor(data, dtype=torch.float32)


def bnb_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
  """backends/default/ops.py quantize_blockwise (and quantize_4bit's indices before packing)."""
  flat = a.reshape(-1).float()
  n = flat.numel()
  rem = n % blocksize
  full = n - rem
  com = flat[:full].reshape(full // blocksize, blocksize)
  absmax = com.abs().max(dim=-1)[0]
  scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
  if rem:
    am = flat[full:].abs().max().clamp(min=1e-38)
    absmax = torch.cat([absmax, am.unsqueeze(0)])
    scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
  bounds = (code[:-1] + code[1:]) / 2
  return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def bnb_nf4(a: torch.Tensor, offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
  """quantize_4bit(a, blocksize=64, compress_statistics=True, quant_type='nf4'): packed codes and nested state;
  `offset` replaces the absmaxes' float32 mean (whose rounding depends on the summation order)."""
  q, absmax = bnb_blockwise(a, torch.tensor(BNB_NF4), 64)
  if q.numel() % 2:
    q = torch.nn.functional.pad(q, (0, 1))
  packed = (q[::2] << 4) | q[1::2]
  offset = absmax.mean() if offset is None else offset
  qabsmax, absmax2 = bnb_blockwise(absmax - offset, bnb_dynamic_map(), 256)
  return {"codes": packed, "absmax": qabsmax, "absmax_scale": absmax2, "offset": offset}


def bnb_dequant_nf4(state: dict[str, torch.Tensor], n: int) -> torch.Tensor:
  """dequantize_4bit with its nested absmax: dequantize_blockwise(absmax) + offset, then the 4-bit codes."""
  def unblock(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    rem = values.numel() % blocksize
    full = values.numel() - rem
    out = (values[:full].view(-1, blocksize) * absmax[:full // blocksize].view(-1, 1)).reshape(full)
    return torch.cat([out, values[full:] * absmax[-1]]) if rem else out

  absmax = unblock(bnb_dynamic_map()[state["absmax"].long()], state["absmax_scale"], 256) + state["offset"]
  idx = torch.empty(state["codes"].numel() * 2, dtype=torch.long)
  idx[1::2] = (state["codes"] & 0xF).long()
  idx[::2] = (state["codes"] >> 4).long()
  return unblock(torch.tensor(BNB_NF4)[idx][:n], absmax, 64)


def bits(a) -> np.ndarray:
  a = np.asarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def test_code_books_are_bitsandbytes():
  assert bits(quant.NF4_CODE).tolist() == bits(np.array(BNB_NF4, np.float32)).tolist()
  assert bits(quant.NF4_CODE).tolist() == bits(bnb_normal_map().numpy()).tolist()  # and as bitsandbytes derives it
  assert bits(quant.DYNAMIC_CODE).tolist() == bits(bnb_dynamic_map().numpy()).tolist()


# Our kernels (*in, *out); bitsandbytes quantises the torch Linear weight (out, in) they stand for.
@pytest.mark.parametrize("shape, n_in", [((64, 96), 1), ((1000, 48), 1), ((7, 13), 1), ((4, 8, 40), 2)],
                         ids=["whole-blocks", "over-256-blocks", "short-last-block", "two-input-dims"])
def test_nf4_matches_bitsandbytes_bit_for_bit(shape, n_in):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
  n_out = int(np.prod(shape[n_in:]))
  weight = torch.from_numpy(w.reshape(-1, n_out).T.copy())  # the torch weight: a row of inputs per output channel
  weight[0, :5] = 0  # a zero, and (for the small shape) nearly a zero block
  w = weight.numpy().T.reshape(shape).copy()
  q = quant.quantise(jnp.asarray(w), "nf4", 0, n_in)
  # The one float that is not bitsandbytes' bit for bit: the absmaxes' mean, which ours rounds correctly (float64
  # sum) and torch's float32 sum rounds its own way. Within an ulp of torch's; from it, everything is bit for bit.
  absmax = bnb_blockwise(weight, torch.tensor(BNB_NF4), 64)[1]
  assert abs(int(bits(q.offset)) - int(bits(absmax.mean().numpy()))) <= 1
  assert float(q.offset) == np.float32(absmax.numpy().astype(np.float64).mean())
  ref = bnb_nf4(weight, torch.tensor(np.asarray(q.offset)))
  for name in ("codes", "absmax", "absmax_scale", "offset"):
    assert bits(getattr(q, name)).tolist() == bits(ref[name].numpy()).tolist(), name
  ours = np.asarray(quant.dequantise(q))
  assert ours.shape == shape
  theirs = bnb_dequant_nf4(ref, w.size).numpy().reshape(n_out, -1).T.reshape(shape)
  assert bits(ours).tolist() == bits(theirs).tolist()


def test_nf4_and_int8_per_layer_and_matmul_gradient():
  """A stacked kernel quantises layer by layer; matmul's input gradient is the dequantised kernel's."""
  w = jax.random.normal(jax.random.key(0), (2, 40, 3, 8)) * 0.02
  x = jax.random.normal(jax.random.key(1), (5, 40))
  for kind in ("nf4", "int8"):
    q = quant.quantise(w, kind, 1, 1)
    layer = jax.tree.map(lambda a: a[1], q)
    assert bits(quant.dequantise(layer)).tolist() == bits(quant.dequantise(quant.quantise(w[1], kind, 0, 1))).tolist()
    kernel = quant.dequantise(layer)
    assert float(jnp.abs(kernel - w[1]).max()) < (0.02 if kind == "nf4" else 0.001)
    np.testing.assert_array_equal(quant.matmul(x, layer, 1), jnp.tensordot(x, kernel, 1))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(quant.matmul(x, layer, 1))))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jnp.sin(jnp.tensordot(x, kernel, 1))))(x), rtol=1e-6)


def test_int8_is_bitsandbytes_vectorwise():
  """int8: round(w * 127 / absmax) per output channel, as bitsandbytes' int8_vectorwise_quant per row of W^T."""
  w = np.random.default_rng(1).standard_normal((24, 10)).astype(np.float32)
  q = quant.quantise(jnp.asarray(w), "int8", 0, 1)
  wt = torch.from_numpy(w.T.copy())  # torch's (out, in) layout: a row per output channel
  stats = torch.max(wt.abs(), dim=1).values.float()
  ref = torch.round(wt * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
  np.testing.assert_array_equal(np.asarray(q.codes).T, ref.numpy())
  np.testing.assert_array_equal(np.asarray(q.absmax), stats.numpy())


LLAMA_LORA = LoraConfig(targets=(r"layers\.attn\.(q|k|v|o)\.kernel", r"layers\.mlp\.(gate|up|down)\.kernel"), rank=4,
                        alpha=8)
OPT = OptimConfig(lr=1e-2, schedule="constant")


def lora_run(model_dir, frozen_dtype: str, remat: str = "none", mesh=None):
  """(model, train step, initial state) of the tiny Llama with LoRA on every layer kernel, base as `frozen_dtype`."""
  mesh = mesh or sharding.make_mesh(MeshConfig())
  model_cfg = ModelConfig(path=str(model_dir), new_params=(), lora=LLAMA_LORA, frozen_dtype=frozen_dtype,
                          remat=remat)
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 0, mesh, head="causal_lm")
  tx = optim.make(OPT, 10)
  shardings = steps.state_shardings(model, tx)
  state = steps.init_state(model, pretrained.load_params(model, model_cfg, reader, 0), tx, 0, shardings)
  step = steps.make_train_step(model, LM, tx, optim.schedule(OPT, 10), jnp.float32, shardings,
                               sharding.batch_sharding(mesh), remat=remat)
  return model, step, state


def lm_batch(model, rows: int = 4):
  rng = np.random.default_rng(0)
  segment_ids = (np.arange(16) < rng.integers(4, 17, rows)[:, None]).astype(np.int32)
  tokens = rng.integers(0, 49152, (rows, 16)).astype(np.int32) * segment_ids
  end = np.zeros((rows, 1), np.int32)
  batch = {"input_ids": tokens, "targets": np.concatenate([tokens[:, 1:], end], 1),
           "segment_ids": segment_ids, "positions": (np.arange(16) * segment_ids).astype(np.int32),
           "loss_mask": np.concatenate([segment_ids[:, 1:], end], 1).astype(np.float32)}
  return batching.to_device(batch, sharding.batch_sharding(model.mesh))


@pytest.mark.parametrize("kind,remat", [("nf4", "none"), ("int8", "full")])
def test_lora_on_a_quantised_base_is_lora_on_its_dequantised_base(tiny_llama_dir, kind, remat):
  """Three steps on an NF4 / int8 base equal three on the float32 weights it dequantises to (loss, adapters), and
  leave the quantised arrays bit for bit as they were."""
  model, step, state = lora_run(tiny_llama_dir, kind, remat)
  assert set(model.quantised) == {p for p in model.frozen if p.startswith("layers.") and p.endswith(".kernel")}
  assert len(model.quantised) == 7
  frozen_before = jax.tree.map(np.asarray, state.frozen)
  ref_model, ref_step, ref_state = lora_run(tiny_llama_dir, "float32", remat)
  ref_state = ref_state._replace(params=jax.tree.map(jnp.copy, state.params), frozen=quant.dequantised(state.frozen))
  batch = lm_batch(model)

  def grads(model, state):  # jitted: op by op, the NF4 case's dequantisation took most of a CI minute
    def loss(p, frozen):
      total, count = LM.loss_terms(model.apply(p, batch, frozen=frozen, dtype=jnp.float32)["logits"], batch)
      return total / count
    return params_lib.flatten(jax.jit(jax.grad(loss))(state.params, state.frozen))

  want = grads(ref_model, ref_state)
  for path, g in grads(model, state).items():  # the step's gradient, each adapter's within 1e-5 of its norm
    assert float(jnp.linalg.norm(g - want[path])) <= 1e-5 * float(jnp.linalg.norm(want[path])), path
  for _ in range(3):
    state, metrics = step(state, batch)
    ref_state, ref_metrics = ref_step(ref_state, batch)
    for key in ("loss", "grad_norm"):
      assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5)
  # Adam divides by sqrt(v), so an element whose gradient is ~0 moves by its float noise times lr: after three
  # steps the adapters agree to 1e-4 norm-wise (the loss, gradient and gradient norm above, to 1e-5).
  for path, want in params_lib.flatten(ref_state.params).items():
    got = params_lib.flatten(state.params)[path]
    assert float(jnp.linalg.norm(got - want)) <= 1e-4 * float(jnp.linalg.norm(want)), path
  after = jax.tree.map(np.asarray, state.frozen)
  assert jax.tree.structure(after) == jax.tree.structure(frozen_before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(frozen_before), strict=True):
    assert a.dtype == b.dtype and bits(a).tobytes() == bits(b).tobytes()
  assert any(isinstance(v, (quant.NF4, quant.Int8)) for v in jax.tree.leaves(state.frozen, is_leaf=quant.is_quantised))


@pytest.mark.parametrize("kind", ["nf4", "int8", "bfloat16"])
def test_the_abstract_train_state_is_the_state_a_run_holds(tiny_llama_dir, kind):
  """steps.abstract_state (what the fit check and `jaxtune plan` compile for, and checkpoints restore into) has
  the quantised / bfloat16 frozen base's very shapes, dtypes and shardings, not the float32 checkpoint's."""
  model, _, state = lora_run(tiny_llama_dir, kind)
  abstract = steps.abstract_state(model, optim.make(OPT, 10), steps.state_shardings(model, optim.make(OPT, 10)))
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
    assert (want.shape, want.dtype, want.sharding) == (got.shape, got.dtype, got.sharding)
  frozen = jax.tree.leaves(abstract.frozen)
  # The analytic plan (GPUs; the suggestions' ranking) counts the frozen base as held, too.
  one_device = dict.fromkeys(sharding.MESH_AXES, 1)
  assert estimate.state_bytes(model, one_device)["frozen_params"] == fit.per_device(abstract.frozen)
  assert jnp.dtype({"nf4": jnp.uint8, "int8": jnp.int8, "bfloat16": jnp.bfloat16}[kind]) in {a.dtype for a in frozen}


SHARDED = """
import hashlib, json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_quant import lm_batch, lora_run
from jaxtune import sharding
from jaxtune.config import MeshConfig
from jaxtune.models import quant

report = {}
for name, mesh_cfg, devices in (("one", MeshConfig(), jax.devices()[:1]),
                                ("fsdp8", MeshConfig(data=1, fsdp=8), jax.devices())):
  model, step, state = lora_run(sys.argv[1], sys.argv[2], mesh=sharding.make_mesh(mesh_cfg, devices))
  kernels = [q for q in jax.tree.leaves(state.frozen, is_leaf=quant.is_quantised) if quant.is_quantised(q)]
  arrays = [a for q in kernels for a in jax.tree.leaves(q)]
  digest = lambda arrays: hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()
  q = state.frozen["layers"]["attn"]["q"]["kernel"]
  report[name] = {
      "kernels": len(kernels), "total": sum(a.nbytes for a in arrays), "digest": digest(arrays),
      "on_first": sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == devices[0]),
      "replicated": sum(a.nbytes for a in arrays if a.sharding.is_fully_replicated),
      "q_specs": [str(a.sharding.spec) for a in jax.tree.leaves(q)]}
  batch = lm_batch(model, rows=8)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  kernels = [q for q in jax.tree.leaves(state.frozen, is_leaf=quant.is_quantised) if quant.is_quantised(q)]
  report[name].update(losses=losses, after=digest(a for q in kernels for a in jax.tree.leaves(q)))
print(json.dumps(report))
"""


# int8 is slow-tier: its placement is nf4's code path with one code per value
@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantised_base_is_split_over_fsdp_like_a_float_one(tiny_llama_dir, kind):
  """With mesh fsdp=8 each device holds 1/8 of the quantised kernels' codes (quantised where their float shards
  were loaded: the same bits as on one device), and LoRA steps on it give the one-device run's losses."""
  env = {**os.environ, "XLA_FLAGS": with_devices(8), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SHARDED, str(tiny_llama_dir), kind], env=env, capture_output=True,
                        text=True, cwd=REPO, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, split = (json.loads(proc.stdout.strip().splitlines()[-1])[k] for k in ("one", "fsdp8"))
  assert one["kernels"] == split["kernels"] == 7 and one["total"] == split["total"]
  assert one["digest"] == split["digest"] == one["after"] == split["after"]
  assert one["on_first"] == one["total"]
  # The codes are 1/8 per device. What stays whole is small: NF4's second-level scales and offsets (1/16384 of the
  # weights: 7 x 2 x 8 bytes here); int8's per-output-channel absmaxes where the kernel's output dims are not split
  # (q, k, v, gate, up: 160 channels per layer, 2 layers, 4 bytes).
  whole = split["replicated"]
  assert whole == {"nf4": 112, "int8": 1280}[kind]
  assert split["on_first"] == whole + (one["total"] - whole) / 8, (split["on_first"], one["total"])
  want = {"nf4": ["P(None, 'fsdp')", "P(None, 'fsdp')", "P(None, None)", "P(None,)"],
          "int8": ["P(None, 'fsdp', None, None)", "P(None, None, None)"]}[kind]
  assert split["q_specs"] == want
  np.testing.assert_allclose(split["losses"], one["losses"], rtol=1e-5)


@pytest.mark.parametrize("model,problem", [
    ({"frozen_dtype": "nf4"}, "nothing is frozen"),
    ({"frozen_dtype": "int8", "freeze": [r"layers\..*"]}, "no LoRA"),
])
def test_unsupported_precision_is_one_clear_error(tiny_llama_dir, model, problem):
  with pytest.raises(UserError, match=f"config key model.frozen_dtype .*{problem}.*model.lora.targets"):
    config_lib.from_dict(ModelConfig, {"path": str(tiny_llama_dir), **model}, "model.")


def test_export_merges_into_bfloat16_and_peft_adapters_name_the_original_base(tiny_llama_dir, tmp_path):
  model, _, state = lora_run(tiny_llama_dir, "nf4")
  rng = np.random.default_rng(0)  # adapters as training leaves them: B no longer zero
  params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), state.params)
  model_cfg = ModelConfig(path=str(tiny_llama_dir), new_params=(), lora=LLAMA_LORA, frozen_dtype="nf4")
  ids, mask, batch = decoder_batch(49152)
  ours = np.asarray(model.apply(params, batch, frozen=state.frozen, dtype=jnp.float32)["logits"])

  merged = export.export(model, params_lib.merge(params, state.frozen), None, model_cfg, tiny_llama_dir,
                         tmp_path / "merged")
  hf_model = load_exported(merged, transformers.LlamaForCausalLM)
  assert {p.dtype for p in hf_model.parameters()} == {torch.bfloat16}
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
  np.testing.assert_allclose(theirs[mask == 1], ours[mask == 1], atol=0.05)  # bfloat16 weights

  adapter = export.export(model, params_lib.merge(params, state.frozen), None, model_cfg, tiny_llama_dir,
                          tmp_path / "peft", peft_adapter=True)
  base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir)  # the float32 checkpoint the run loaded
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  float_model = dataclasses.replace(model, frozen_dtype="float32", quantised={})
  float_base = pretrained.load_params(float_model, model_cfg, pretrained.open_checkpoint(model_cfg)[1], 0,
                                      model.frozen)
  ours_on_base = np.asarray(model.apply(params, batch, frozen=float_base, dtype=jnp.float32)["logits"])
  np.testing.assert_allclose(theirs[mask == 1], ours_on_base[mask == 1], atol=1e-4)


def test_nf4_error_on_the_packaged_q4_1_weights_is_that_of_gaussian_weights():
  """docs/large_models.md: quantising SmolLM2's already 4-bit (Q4_1) kernels to NF4 loses no more than quantising
  Gaussian weights of the same spread (relative error ~9%), so QLoRA's gap there is not from double 4-bit rounding."""
  import gguf as gguf_package
  from gguf import quants

  from jaxtune.weights import gguf

  tensor = next(t for t in gguf_package.GGUFReader(gguf.find_packaged_smollm2()).tensors
                if t.name == "blk.3.ffn_up.weight")
  w = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).T  # our kernel (in, out)

  def error(w):
    back = np.asarray(quant.dequantise(quant.quantise(jnp.asarray(w)[None], "nf4", 1, 1)))[0]
    return float(np.linalg.norm(back - w) / np.linalg.norm(w))

  packaged = error(w)
  along_outputs = error(w.T)  # blocks of 64 outputs of one input, as jaxtune grouped them before 265dc2b
  gaussian = error(np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * w.std())
  print(f"NF4 relative error: packaged Q4_1 kernel {packaged:.4f} (blocks along the outputs {along_outputs:.4f}), "
        f"Gaussian {gaussian:.4f}")
  assert 0.085 < gaussian < 0.1 and abs(packaged - gaussian) < 0.005 and abs(along_outputs - packaged) < 0.005
