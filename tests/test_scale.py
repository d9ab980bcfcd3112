"""Gradient accumulation and rematerialisation change how a step runs, never what it computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import MeshConfig, ModelConfig, OptimConfig
from jaxtune.data import batching
from jaxtune.models import model as model_lib
from jaxtune.tasks import TASKS
from jaxtune.train import optim, steps
from jaxtune.weights import pretrained

LM = TASKS["causal_lm"]
OPT = OptimConfig(lr=1e-3, schedule="constant")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
  mesh = sharding.make_mesh(MeshConfig())
  model_cfg = ModelConfig(path=str(tiny_llama_dir), new_params=())
  hf_config, reader = pretrained.open_checkpoint(model_cfg)
  model = pretrained.from_config(hf_config, model_cfg, 0, mesh, head="causal_lm")
  tx = optim.make(OPT, 10)
  return model, tx, steps.state_shardings(model, tx), sharding.batch_sharding(mesh), (model_cfg, reader)


def fresh_state(llama):
  model, tx, shardings, _, (model_cfg, reader) = llama
  return steps.init_state(model, pretrained.load_params(model, model_cfg, reader, 0), tx, 0, shardings)


def lm_batch(batch_sharding, rows=8, length=16, vocab=49152):
  """One document per row, of 3..16 tokens, so each row (and microbatch) has its own target count."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, length + 1, rows)
  segment_ids = (np.arange(length) < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32) * segment_ids
  targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], 1)
  loss_mask = np.concatenate([segment_ids[:, 1:], np.zeros((rows, 1), np.int32)], 1).astype(np.float32)
  batch = {"input_ids": tokens, "targets": targets, "segment_ids": segment_ids,
           "positions": (np.arange(length) * segment_ids).astype(np.int32), "loss_mask": loss_mask}
  return batching.to_device(batch, batch_sharding), loss_mask


def step_fn(llama, **kwargs):
  model, tx, shardings, batch_sharding, _ = llama
  return steps.make_train_step(model, LM, tx, optim.schedule(OPT, 10), jnp.float32, shardings, batch_sharding,
                               **kwargs)


def test_accumulated_microbatches_give_the_big_batch_update(llama):
  batch, loss_mask = lm_batch(llama[3])
  # Microbatch i holds rows i, i+4: their target counts differ, so a mean of per-microbatch means
  # would not be the big batch's mean; only dividing the summed loss by the summed count is.
  counts = [loss_mask[i::4].sum() for i in range(4)]
  assert len(set(counts)) > 1
  big, big_metrics = step_fn(llama)(fresh_state(llama), batch)
  acc, acc_metrics = step_fn(llama, grad_accum=4)(fresh_state(llama), batch)
  assert float(acc_metrics["loss"]) == pytest.approx(float(big_metrics["loss"]), rel=1e-6)
  assert float(acc_metrics["grad_norm"]) == pytest.approx(float(big_metrics["grad_norm"]), rel=1e-5)
  for path, want in params_lib.flatten(big.params).items():
    np.testing.assert_allclose(np.asarray(params_lib.flatten(acc.params)[path]), np.asarray(want), atol=1e-6,
                               rtol=0, err_msg=path)


def test_remat_gives_the_same_gradients_from_a_different_program(llama):
  model, batch = llama[0], lm_batch(llama[3])[0]
  params = fresh_state(llama).params

  def grad_fn(policy):
    def loss_sum(p):
      return LM.loss_terms(model.apply(p, batch, remat=policy)["logits"], batch)[0]
    return jax.jit(jax.grad(loss_sum))

  programs = {policy: grad_fn(policy).lower(params).compile().as_text() for policy in ("none", "full", "dots")}
  assert len(set(programs.values())) == 3  # each policy really compiles to its own program
  # Both run scanned; full remat recomputes the forward matmuls inside the backward pass, dots keeps them.
  assert programs["full"].count(" dot(") > programs["dots"].count(" dot(")
  want = params_lib.flatten(grad_fn("none")(params))
  for policy in ("full", "dots"):
    got = params_lib.flatten(grad_fn(policy)(params))
    for path, g in want.items():
      np.testing.assert_allclose(np.asarray(got[path]), np.asarray(g), atol=1e-6, rtol=1e-5, err_msg=f"{policy} {path}")


def _tiny_llama(depth: int, scan_layers: bool, dropout: float = 0.0):
  from jaxtune.models.llama import LlamaConfig

  cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=depth,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, scan_layers=scan_layers,
                    attention_dropout=dropout)
  return model_lib.describe("llama", cfg, sharding.make_mesh(MeshConfig()))


TINY_BATCH = {"input_ids": jnp.ones((2, 8), jnp.int32), "segment_ids": jnp.ones((2, 8), jnp.int32),
              "positions": jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1))}


def test_the_compiled_program_does_not_grow_with_depth_when_scanned():
  """model.scan_layers: 2 and 8 layers lower to the same ops (only the trip count differs); unrolled, they grow."""
  programs = {}
  for scan_layers in (True, False):
    for depth in (2, 8):
      model = _tiny_llama(depth, scan_layers)
      params = model_lib.init_params(model, 0)
      assert params["layers"]["attn"]["q"]["kernel"].shape == (depth, 16, 2, 8)
      loss = lambda p, model=model: model.apply(p, TINY_BATCH)["logits"].sum()
      programs[scan_layers, depth] = jax.jit(jax.grad(loss)).lower(params).as_text()
  count = lambda text: {op: text.count(op) for op in ("dot_general", "while", "exponential")}
  assert count(programs[True, 2]) == count(programs[True, 8]) and count(programs[True, 2])["dot_general"] > 0
  unrolled = {depth: count(programs[False, depth]) for depth in (2, 8)}
  assert unrolled[2]["while"] == unrolled[8]["while"] == 0
  assert unrolled[8]["dot_general"] > 3 * unrolled[2]["dot_general"] > 0


def test_unrolled_layers_compute_what_the_scan_computes():
  """Same params, batch and dropout key: loss and every gradient of the unrolled stack equal the scanned one's."""
  batch = {**TINY_BATCH, "input_ids": jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64}
  grads = {}
  for scan_layers in (True, False):
    model = _tiny_llama(3, scan_layers, dropout=0.3)
    params = model_lib.init_params(model, 0)
    loss = lambda p, model=model: (model.apply(p, batch, dropout_rng=jax.random.key(1))["logits"] ** 2
                                   ).mean()
    grads[scan_layers] = jax.jit(jax.value_and_grad(loss))(params)
  assert grads[True][0] != 0
  np.testing.assert_allclose(grads[False][0], grads[True][0], rtol=1e-6)
  flat = {k: params_lib.flatten(g[1]) for k, g in grads.items()}
  for path, g in flat[True].items():
    np.testing.assert_allclose(np.asarray(flat[False][path]), np.asarray(g), rtol=1e-5, atol=1e-7, err_msg=path)


def test_remat_runs_the_layers_scanned_and_keeps_less():
  """Unrolled layers (model.scan_layers: false) with remat run as the scan does; XLA's temp buffer shrinks."""
  batch = {"input_ids": jnp.zeros((8, 256), jnp.int32), "segment_ids": jnp.ones((8, 256), jnp.int32),
           "positions": jnp.tile(jnp.arange(256, dtype=jnp.int32), (8, 1))}
  compiled = {}
  for scan_layers, remat in ((False, "none"), (False, "full"), (True, "full")):
    model = _tiny_llama(6, scan_layers)
    params = model_lib.init_params(model, 0)
    loss = lambda p, model=model, remat=remat: (model.apply(p, batch, remat=remat)["logits"] ** 2).mean()
    compiled[scan_layers, remat] = jax.jit(jax.grad(loss)).lower(params).compile()
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert "while" in compiled[False, "full"].as_text() and "while" not in compiled[False, "none"].as_text()
  assert temp[False, "full"] == temp[True, "full"] < temp[False, "none"] / 3
