"""The encoders' sequence-classification head reads the first token's last hidden state alone, so their last layer
computes only that token (models/encoder.py): the same loss and gradients as computing every token, in every
family, unrolled, scanned and rematerialised, and fewer FLOPs in the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_encoder_families import CONFIGS, batch

from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig
from jaxtune.models import model as model_lib
from jaxtune.weights import pretrained

MESH = sharding.make_mesh(MeshConfig())


def classifier(family: str, hf: dict | None = None, **model_cfg):
  """A random classification model of `family`'s tiny config (updated by `hf`), its params and a padded batch."""
  model = pretrained.from_config({**CONFIGS[family].to_dict(), **(hf or {})}, ModelConfig(path="tiny", **model_cfg), 5,
                                 MESH, head="classification")
  inputs = {k: jnp.asarray(v) for k, v in batch(family).items()}
  return model, model_lib.init_params(model, 0), inputs


def loss(params, model, inputs, all_hidden: bool, **kwargs) -> jax.Array:
  logits = model.apply(params, inputs, all_hidden=all_hidden, **kwargs)["logits"]
  return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), jnp.arange(logits.shape[0]) % 5].sum()


@pytest.mark.parametrize("family, scan, remat", [*((f, False, "none") for f in CONFIGS), ("bert", True, "none"),
                                                 ("electra", True, "full")])
def test_first_token_only_gives_the_same_loss_and_gradients(family, scan, remat):
  model, params, inputs = classifier(family, scan_layers=scan, dropout=0.0)
  grad = jax.value_and_grad(loss)
  (full, g_full), (first, g_first) = (grad(params, model, inputs, all_hidden, remat=remat)
                                      for all_hidden in (True, False))
  np.testing.assert_allclose(first, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_first), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  hidden = model.apply(params, inputs)["hidden"]
  assert hidden.shape == (3, 1, model.cfg.hidden_size)
  assert model.apply(params, inputs, all_hidden=True)["hidden"].shape == (3, 12, model.cfg.hidden_size)


def test_dropout_still_drops_in_the_last_layer():
  """One layer, the last, and dropout only on its attention probabilities (the single query's, on XLA's ops): each
  key drops differently, and no key drops nothing."""
  model, params, inputs = classifier("bert", {"num_hidden_layers": 1, "hidden_dropout_prob": 0.0,
                                              "attention_probs_dropout_prob": 0.5, "classifier_dropout": 0.0})
  keys = [jax.random.key_data(jax.random.key(s)) for s in (0, 1)]
  losses = [float(loss(params, model, inputs, False, dropout_rng=k)) for k in keys]
  plain = float(loss(params, model, inputs, False))
  assert len({*losses, plain}) == 3 and all(np.isfinite(losses))


def test_the_compiled_step_does_less_work():
  """The saving is in the program XLA runs, not only in the trace: two layers, the last one mostly skipped."""
  model, params, inputs = classifier("bert", dropout=0.0)
  flops = {all_hidden: jax.jit(jax.grad(lambda p, a=all_hidden: loss(p, model, inputs, a))).lower(params)
           .compile().cost_analysis()["flops"] for all_hidden in (True, False)}
  assert flops[False] < 0.8 * flops[True], flops
