"""Fit before start (train/fit.py): the train step compiled for the run's devices before any weight is read; a run
that cannot fit is refused with one line (need, capacity, the cheapest change), and one that fits pays no second
compile for it."""

from __future__ import annotations

import jax
import pytest
from conftest import write_config

from jaxtune import config as config_lib
from jaxtune.errors import UserError
from jaxtune.train import fit, loop, setup


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


@pytest.mark.parametrize("base", [[], ["model.lora.targets=['.*layers[.].*[.]kernel']", "model.frozen_dtype=nf4"]],
                         ids=["float32", "qlora-nf4"])
def test_a_run_that_fits_compiles_its_train_step_once(tmp_path, tiny_bert_dir, reviews, base):
  """The check's compile is the one the first step uses: one train-step compile in all (one batch shape here),
  also where the frozen base is held as NF4 (the check compiles for the quantised arrays the run then holds)."""
  compiles = []

  def on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    cfg = _cfg(tmp_path, tiny_bert_dir, reviews, "train.batch_size=8", "data.validation_holdout=0", *base)  # no eval
    run = setup.prepare(cfg, tmp_path / "run")
    before = len(compiles)
    loop.loop(run)
    run.ckpts.wait()
    run.ckpts.close()
    run.lock.release()
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert "jit(step)" in compiles[:before], compiles  # the check compiled the train step (steps.make_train_step's)
  assert "jit(step)" not in compiles[before:], compiles  # and training found it compiled
