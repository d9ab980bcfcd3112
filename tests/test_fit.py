"""Fit before start (train/fit.py): the train step compiled for the run's devices before any weight is read; a run
that cannot fit is refused with one line (need, capacity, the cheapest change), and one that fits pays no second
compile for it."""

from __future__ import annotations

import collections
import contextlib

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import write_config

from jaxtune import config as config_lib
from jaxtune.errors import UserError
from jaxtune.train import fit, loop, setup, steps


def _cfg(tmp_path, tiny_bert_dir, reviews, *overrides):
  return config_lib.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews),
                         ["train.max_steps=2", "train.eval_every=0", "data.length_buckets=[]", *overrides])


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, tiny_bert_dir, reviews, monkeypatch):
  capacity = 64 * 2**10  # 64 KiB per device: not even the tiny model's params
  monkeypatch.setattr(fit, "capacity_per_device", lambda mesh: (float(capacity), "test capacity"))
  read = []
  monkeypatch.setattr(setup.pretrained, "load_params", lambda *a, **k: read.append(1))
  with pytest.raises(UserError) as e:
    setup.prepare(_cfg(tmp_path, tiny_bert_dir, reviews), tmp_path / "run")
  message = str(e.value)
  assert "does not fit" in message and "GiB per device" in message and "test capacity" in message, message
  assert "\n" not in message and ("cheapest change" in message or "no config change" in message), message
  assert not read and not (tmp_path / "run").exists()  # no weight read, no run dir


@contextlib.contextmanager
def compiled_functions():
  """The names of the functions XLA compiles while the block runs, in order."""
  compiles = []

  def on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def train(run):
  """The prepared run's loop to its end, its checkpoints committed and its lock released; loop.loop's result."""
  try:
    return loop.loop(run)
  finally:
    run.ckpts.wait()
    run.ckpts.close()
    run.lock.release()


@pytest.mark.parametrize("base", [[], ["model.lora.targets=['.*layers[.].*[.]kernel']", "model.frozen_dtype=nf4"]],
                         ids=["float32", "qlora-nf4"])
def test_a_run_that_fits_compiles_its_train_step_once(tmp_path, tiny_bert_dir, reviews, base):
  """The check's compile is the one the first step uses: one train-step compile in all (one batch shape here),
  also where the frozen base is held as NF4 (the check compiles for the quantised arrays the run then holds)."""
  with compiled_functions() as compiles:
    cfg = _cfg(tmp_path, tiny_bert_dir, reviews, "train.batch_size=8", "data.validation_holdout=0", *base)  # no eval
    run = setup.prepare(cfg, tmp_path / "run")
    before = len(compiles)
    train(run)
  assert "jit(step)" in compiles[:before], compiles  # the check compiled the train step (steps.make_train_step's)
  assert "jit(step)" not in compiles[before:], compiles  # and training found it compiled


def test_batches_that_move_between_buckets_compile_once_per_shape(tmp_path, tiny_bert_dir, reviews):
  """Mixed lengths, no grouping: batches hop between buckets, and the train step compiles once per bucket
  it meets (the fit check's compile serving the first), never again when a shape comes back. The loop's step
  times (timing.json's train_by_length) count each step under its batch's padded length."""
  with compiled_functions() as compiles:
    frame = pd.read_csv(reviews["train"])  # each review cut to 1-30 words, as short real text comes
    cut = np.random.default_rng(0).integers(1, 31, len(frame))
    frame["review"] = [" ".join(str(r).split()[:n]) for r, n in zip(frame["review"], cut, strict=True)]
    frame.to_csv(tmp_path / "short.csv", index=False)
    cfg = _cfg(tmp_path, tiny_bert_dir, reviews, "train.batch_size=2", "train.max_steps=12", "data.max_len=64",
               f"data.train={tmp_path / 'short.csv'}", "data.validation_holdout=0", "data.length_buckets=[16,32,64]",
               "train.compile_cache=''")
    run = setup.prepare(cfg, tmp_path / "run")
    shapes = [steps.device_batch(run.task, data, rows, 2, cfg, run.batch_sharding)["input_ids"].shape
              for data, rows in run.feed.batches(0, run.steps)]
    *_, times = train(run)[2]
  changes = sum(a != b for a, b in zip(shapes, shapes[1:]))
  assert len(set(shapes)) >= 2 and changes >= 3, shapes  # the shapes really come back
  assert compiles.count("jit(step)") == len(set(shapes)), compiles
  by_length = times.summary()
  assert {int(n): e["steps"] for n, e in by_length.items()} == collections.Counter(s[1] for s in shapes)
  assert all(0 <= e["waited_s"] <= e["s"] and e["first_s"] <= e["s"] for e in by_length.values()), by_length


def lowered_step_text(cfg) -> str:
  """The train step of `cfg` as XLA receives it (what the persistent compile cache keys on)."""
  from jaxtune import sharding
  from jaxtune.tasks import TASKS
  from jaxtune.train import optim
  from jaxtune.weights import pretrained

  mesh = sharding.make_mesh(cfg.mesh)
  hf_config, _ = pretrained.open_checkpoint(cfg.model)
  model = pretrained.from_config(hf_config, cfg.model, 2, mesh, head="classification")
  total = cfg.train.max_steps
  tx = optim.make(cfg.optim, total)
  shardings = steps.state_shardings(model, tx)
  batch_sharding = sharding.batch_sharding(mesh)
  step = steps.make_train_step(model, TASKS[cfg.task], tx, optim.schedule(cfg.optim, total), jax.numpy.float32,
                               shardings, batch_sharding)
  return step.lower(steps.abstract_state(model, tx, shardings), fit.batch_structs(cfg, batch_sharding)).as_text()


def test_a_changed_schedule_length_or_lr_compiles_the_same_program(tmp_path, tiny_bert_dir, reviews):
  """train.max_steps, optim.warmup_steps, optim.lr and optim.weight_decay reach the step as an argument
  (optim.hyperparams), not as constants: the lowered program, and so its compile-cache key, is the same."""
  base = lowered_step_text(_cfg(tmp_path, tiny_bert_dir, reviews, "train.max_steps=4"))
  longer = lowered_step_text(_cfg(tmp_path, tiny_bert_dir, reviews, "train.max_steps=40", "optim.warmup_steps=7",
                                  "optim.lr=3e-4", "optim.weight_decay=0.1"))
  assert longer == base
  other_b2 = lowered_step_text(_cfg(tmp_path, tiny_bert_dir, reviews, "train.max_steps=4", "optim.b2=0.98"))
  assert other_b2 != base  # the comparison sees a constant that does change the program
