"""Dropout matches transformers' PyTorch modules in train mode: same keep rate, same 1/(1 - rate) scaling.

JAX and torch never share masks, so each site is compared by distribution: identical weights and batch
(with padding), N dropout samples of the output per side, then per-element means and variances. Every
site runs with only its own rate non-zero (read from the saved config.json), and the same comparator
must reject a deliberately wrong JAX side (no rescaling, or the rate doubled), so each check bites.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.models import cpu_attention, layers
from jaxtune.models import model as model_lib
from jaxtune.weights import pretrained

MESH = sharding.make_mesh(MeshConfig())
RATE = 0.1
N = 1000  # dropout samples per side
REPS = 500  # samples per torch forward: the batch tiled REPS times, as every element draws its own mask
Z_MAX = 6.0  # per-element |z| bound, with slack for testing thousands of correlated elements at once
VAR_TOL = 0.1  # allowed relative gap between summed variances
# Threefry under vmap takes XLA seconds to optimise on CPU; unoptimised it compiles ~10x faster and still runs in <1 s.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

B, L, V = 3, 12, 99
_rng = np.random.default_rng(0)
IDS_BxL = _rng.integers(0, V, (B, L))
TYPES_BxL = _rng.integers(0, 2, (B, L))
MASK_BxL = np.ones((B, L), np.int64)
MASK_BxL[1, 7:] = 0  # right padding, so the key mask is exercised and pad positions are left out
REAL_BxL = MASK_BxL.astype(bool)
X_BxLxD = _rng.normal(size=(B, L, 32)).astype(np.float32)  # a BERT layer's input when called alone
# The HF models run eager attention, HF's reference path, where the attention-probability dropout is spelled out.


def bert_config(**rates: float | None) -> transformers.BertConfig:
  """A tiny BERT whose dropout rates are all 0 but `rates`."""
  zero = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
  return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64, num_labels=3,
                                 attn_implementation="eager", **{**zero, **rates})


def gpt2_config(**rates: float) -> transformers.GPT2Config:
  """A tiny GPT-2 whose dropout rates are all 0 but `rates`."""
  zero = {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0}
  return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 attn_implementation="eager", **{**zero, **rates})


def llama_config(**rates: float) -> transformers.LlamaConfig:
  """A tiny Llama with grouped-query attention (4 query heads on 2 kv heads)."""
  return transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  attn_implementation="eager", **rates)


def tile(a: np.ndarray, reps: int) -> torch.Tensor:
  """`a` repeated `reps` times along the batch axis."""
  return torch.from_numpy(np.tile(a, (reps,) + (1,) * (a.ndim - 1)))


def per_token(out_BxLx_: torch.Tensor, reps: int) -> torch.Tensor:
  """reps x E: the real positions of each replica's output, flattened."""
  return out_BxLx_.reshape(reps, B, L, -1)[:, torch.from_numpy(REAL_BxL)].reshape(reps, -1)


def decoder_batch() -> dict[str, jax.Array]:
  return {"input_ids": jnp.asarray(IDS_BxL), "segment_ids": jnp.asarray(MASK_BxL),
          "positions": jnp.asarray(np.maximum(np.cumsum(MASK_BxL, 1) - 1, 0))}


def bert_batch() -> dict[str, jax.Array]:
  return {"input_ids": jnp.asarray(IDS_BxL), "attention_mask": jnp.asarray(MASK_BxL),
          "token_type_ids": jnp.asarray(TYPES_BxL)}


def bert_layer0(model: model_lib.Model, params: dict) -> nnx.Module:
  """Our first BERT layer alone: the stack's graphdef merged with the layer-0 slice of its params (as in scan)."""
  graphdef, state = nnx.split(model.module(params).bert.layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], nnx.to_pure_dict(state)))


# What a site compares: ours(model, params, key) -> E values; theirs(HF model, reps) -> reps x E values.
Ours = Callable[[model_lib.Model, dict, jax.Array | None], jax.Array]
Theirs = Callable[[torch.nn.Module, int], torch.Tensor]


def bert_embeddings_ours(model: model_lib.Model, params: dict, key: jax.Array | None) -> jax.Array:
  emb = model.module(params).bert.embeddings
  return emb(jnp.asarray(IDS_BxL), jnp.asarray(MASK_BxL), jnp.asarray(TYPES_BxL), jnp.float32, key)[REAL_BxL].ravel()


def bert_embeddings_theirs(ref: torch.nn.Module, reps: int) -> torch.Tensor:
  return per_token(ref.bert.embeddings(input_ids=tile(IDS_BxL, reps), token_type_ids=tile(TYPES_BxL, reps)), reps)


def bert_layer_ours(model: model_lib.Model, params: dict, key: jax.Array | None) -> jax.Array:
  return bert_layer0(model, params)(jnp.asarray(X_BxLxD), jnp.asarray(MASK_BxL), key, layers.Context())[REAL_BxL].ravel()


def bert_layer_theirs(ref: torch.nn.Module, reps: int) -> torch.Tensor:
  bias = (1.0 - tile(MASK_BxL, reps)[:, None, None, :].float()) * torch.finfo(torch.float32).min
  return per_token(ref.bert.encoder.layer[0](tile(X_BxLxD, reps), attention_mask=bias), reps)


def bert_model_ours(model: model_lib.Model, params: dict, key: jax.Array | None) -> jax.Array:
  out = model.apply(params, bert_batch(), dropout_rng=key, all_hidden=True)
  return jnp.concatenate([out["hidden"][REAL_BxL].ravel(), out["logits"].ravel()])


def bert_model_theirs(ref: torch.nn.Module, reps: int) -> torch.Tensor:
  out = ref(input_ids=tile(IDS_BxL, reps), attention_mask=tile(MASK_BxL, reps),
            token_type_ids=tile(TYPES_BxL, reps), output_hidden_states=True)
  return torch.cat([per_token(out.hidden_states[-1], reps), out.logits.reshape(reps, -1)], 1)


def bert_logits_ours(model: model_lib.Model, params: dict, key: jax.Array | None) -> jax.Array:
  return model.apply(params, bert_batch(), dropout_rng=key)["logits"].ravel()


def bert_logits_theirs(ref: torch.nn.Module, reps: int) -> torch.Tensor:
  out = ref(input_ids=tile(IDS_BxL, reps), attention_mask=tile(MASK_BxL, reps), token_type_ids=tile(TYPES_BxL, reps))
  return out.logits.reshape(reps, -1)


def decoder_ours(model: model_lib.Model, params: dict, key: jax.Array | None) -> jax.Array:
  return model.apply(params, decoder_batch(), dropout_rng=key)["logits"][REAL_BxL].ravel()


def decoder_theirs(ref: torch.nn.Module, reps: int) -> torch.Tensor:
  return per_token(ref(input_ids=tile(IDS_BxL, reps), attention_mask=tile(MASK_BxL, reps)).logits, reps)


@dataclasses.dataclass(frozen=True)
class Site:
  hf_config: transformers.PretrainedConfig  # only `key` non-zero among the dropout rates
  hf_class: type
  key: str  # the HF config key of the rate, which is also our config's field
  ours: Ours
  theirs: Theirs


BERT_CLS, GPT2_LM = transformers.BertForSequenceClassification, transformers.GPT2LMHeadModel
SITES = {
    "bert_embeddings": Site(bert_config(hidden_dropout_prob=RATE), BERT_CLS, "hidden_dropout_prob",
                            bert_embeddings_ours, bert_embeddings_theirs),
    # one layer alone isolates the attention-output and MLP-output dropouts from the embeddings'
    "bert_layer_residual": Site(bert_config(hidden_dropout_prob=RATE), BERT_CLS, "hidden_dropout_prob",
                                bert_layer_ours, bert_layer_theirs),
    "bert_attention_probs": Site(bert_config(attention_probs_dropout_prob=RATE), BERT_CLS,
                                 "attention_probs_dropout_prob", bert_model_ours, bert_model_theirs),
    # the whole model: every layer gets its key, and the head falls back to hidden_dropout_prob as HF's does
    "bert_hidden": Site(bert_config(hidden_dropout_prob=RATE, classifier_dropout=None), BERT_CLS,
                        "hidden_dropout_prob", bert_model_ours, bert_model_theirs),
    "bert_classifier": Site(bert_config(classifier_dropout=RATE), BERT_CLS, "classifier_dropout",
                            bert_logits_ours, bert_logits_theirs),
    "gpt2_embd": Site(gpt2_config(embd_pdrop=RATE), GPT2_LM, "embd_pdrop", decoder_ours, decoder_theirs),
    "gpt2_attn": Site(gpt2_config(attn_pdrop=RATE), GPT2_LM, "attn_pdrop", decoder_ours, decoder_theirs),
    "gpt2_resid": Site(gpt2_config(resid_pdrop=RATE), GPT2_LM, "resid_pdrop", decoder_ours, decoder_theirs),
    "llama_attention_gqa": Site(llama_config(attention_dropout=RATE), transformers.LlamaForCausalLM,
                                "attention_dropout", decoder_ours, decoder_theirs),
}


def unscaled_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """A wrong dropout: the right keep rate, but survivors are not rescaled by 1 / (1 - rate)."""
  if rng is None or rate == 0.0:
    return x
  return jnp.where(jax.random.bernoulli(rng, 1.0 - rate, x.shape), x, 0).astype(x.dtype)


def sample_ours(site: Site, model: model_lib.Model, params: dict) -> np.ndarray:
  """N x E: the output under keys 0..N-1, all in one jitted vmap."""
  fn = jax.jit(lambda p, ks: jax.vmap(lambda k: site.ours(model, p, k))(ks), compiler_options=FAST_COMPILE)
  return np.asarray(fn(params, jax.vmap(jax.random.key)(jnp.arange(N))))


def sample_theirs(site: Site, ref: torch.nn.Module) -> np.ndarray:
  """N x E: the HF model's output in train mode, REPS samples per seeded forward."""
  ref.train()
  chunks = []
  with torch.no_grad():
    for i in range(N // REPS):
      torch.manual_seed(i)
      chunks.append(site.theirs(ref, REPS).numpy())
  return np.concatenate(chunks)


def compare(ours_NxE: np.ndarray, theirs_NxE: np.ndarray) -> dict[str, float]:
  """Per-element z-scores of the mean and variance gaps, and the ratio of summed variances."""
  a, b = ours_NxE.astype(np.float64), theirs_NxE.astype(np.float64)
  n = len(a)
  ma, mb, va, vb = a.mean(0), b.mean(0), a.var(0, ddof=1), b.var(0, ddof=1)
  assert (vb > 0).all(), "every compared element must vary under torch's dropout"
  z_mean = np.abs(ma - mb) / np.sqrt((va + vb) / n)
  # a sample variance's standard error comes from the fourth central moment: dropout outputs are heavy-tailed
  var_of_va, var_of_vb = ((a - ma) ** 4).mean(0) - va**2, ((b - mb) ** 4).mean(0) - vb**2
  z_var = np.abs(va - vb) / np.sqrt((var_of_va + var_of_vb) / n)
  return {"z_mean_max": float(z_mean.max()), "z_var_max": float(z_var.max()), "var_ratio": float(va.sum() / vb.sum())}


def agrees(s: dict[str, float]) -> bool:
  return s["z_mean_max"] < Z_MAX and s["z_var_max"] < Z_MAX and abs(s["var_ratio"] - 1) < VAR_TOL


Setup = tuple[Site, model_lib.Model, dict, torch.nn.Module, np.ndarray]  # ..., HF model, its N x E samples


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Setup]:
  """site name -> its setup, built once: the correct side and both wrong sides reuse torch's samples."""
  cache: dict[str, Setup] = {}

  def get(name: str) -> Setup:
    if name not in cache:
      site = SITES[name]
      path = tmp_path_factory.mktemp(name)
      torch.manual_seed(0)
      ref = site.hf_class(site.hf_config)
      ref.save_pretrained(path)
      model, params = pretrained.from_pretrained(ModelConfig(path=str(path), new_params=()), 3, MESH, 0)
      cache[name] = (site, model, params, ref, sample_theirs(site, ref))
    return cache[name]

  return get


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_one_minus_rate_and_rescales_like_torch(rate: float):
  x = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
  ours = np.asarray(layers.dropout(jnp.asarray(x), rate, jax.random.key(0)))
  torch.manual_seed(0)
  theirs = torch.nn.functional.dropout(torch.from_numpy(x), rate, training=True).numpy()
  sd = np.sqrt(rate * (1 - rate) / x.size)  # of a binomial fraction
  for out in (ours, theirs):
    assert abs((out == 0).mean() - rate) < 5 * sd, (out == 0).mean()
    kept = out != 0  # survivors are x / (1 - rate): both sides multiply by the float32 reciprocal, within 2 ulp
    np.testing.assert_allclose(out[kept], x[kept] / (1 - rate), rtol=2.5e-7)
  np.testing.assert_array_equal(np.asarray(layers.dropout(jnp.asarray(x), rate, None)), x)  # evaluation


@pytest.mark.parametrize("name", SITES)
def test_dropout_statistics_match_torch_train_mode(setups: Callable[[str], Setup], name: str):
  site, model, params, ref, theirs = setups(name)
  # the loader read the rate from config.json, and every other rate is off on our side too
  assert getattr(model.cfg, site.key) == RATE
  assert all(getattr(model.cfg, k) in (0.0, None) for k in type(model.cfg).DROPOUT_KEYS if k != site.key)
  with torch.no_grad():  # without dropout both sides agree, so what follows is about dropout alone
    want = site.theirs(ref.eval(), 1)[0].numpy()
  got = jax.jit(lambda p: site.ours(model, p, None), compiler_options=FAST_COMPILE)(params)
  assert np.abs(np.asarray(got) - want).max() <= 1e-5
  s = compare(sample_ours(site, model, params), theirs)
  assert agrees(s), s


# Every site meets one kind of wrong dropout in the default run, the kinds alternating over the sites; the other
# kind is slow-tier (the same comparator, its other statistic).
WRONG = [pytest.param(name, wrong, marks=() if (i + j) % 2 == 0 else pytest.mark.slow)
         for i, name in enumerate(SITES) for j, wrong in enumerate(["unscaled", "rate_doubled"])]


@pytest.mark.parametrize(("name", "wrong"), WRONG)
def test_comparator_rejects_wrong_dropout(setups: Callable[[str], Setup], monkeypatch: pytest.MonkeyPatch, name: str,
                                         wrong: str):
  site, model, params, _, theirs = setups(name)
  if wrong == "unscaled":
    monkeypatch.setattr(layers, "dropout", unscaled_dropout)
    # attention dropout in XLA's ops, which call layers.dropout; the CPU kernel draws the same masks
    # (test_cpu_attention.py) and is what test_dropout_statistics_match_torch_train_mode measured
    monkeypatch.setattr(cpu_attention, "loaded", lambda: False)
  else:
    cfg = dataclasses.replace(model.cfg, **{site.key: 2 * RATE})
    model = model_lib.describe(model.family, cfg, MESH)
  s = compare(sample_ours(site, model, params), theirs)
  assert not agrees(s), s
  # each wrong side is caught by the statistic made for it: the mean for scaling, the variance for the rate
  assert s["z_mean_max"] >= Z_MAX if wrong == "unscaled" else s["var_ratio"] - 1 >= VAR_TOL, s
