"""Non-finite steps (train.nonfinite), the run-dir lock and signal handling, in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import records, write_config
from test_train import CLS, tiny_state, toy_batch

from jaxtune import config, errors
from jaxtune import params as params_lib
from jaxtune.config import OptimConfig
from jaxtune.data import batching
from jaxtune.errors import UserError
from jaxtune.train import loop, optim, rundir, steps
from jaxtune.train.checkpoints import Checkpoints


def test_a_skipped_non_finite_step_changes_nothing_and_says_so(tiny_bert_dir):
  model, tx, state, bs = tiny_state(tiny_bert_dir)
  shardings = steps.state_shardings(model, tx)
  step = steps.make_train_step(model, CLS, tx, optim.schedule(OptimConfig(), 10), jnp.float32, shardings, bs,
                               skip_nonfinite=True)
  before = jax.device_get((state.params, state.opt_state))
  poisoned = {**toy_batch(bs), "weights": jnp.full((8,), jnp.nan)}
  state, metrics = step(state, poisoned)
  assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
  assert int(state.step) == 1  # the batch counts as consumed
  for want, got in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
    np.testing.assert_array_equal(want, got)
  state, metrics = step(state, toy_batch(bs))
  assert bool(metrics["finite"])
  changed = jax.device_get(state.params)
  assert not np.array_equal(params_lib.flatten(changed)["classifier.kernel"],
                            params_lib.flatten(before[0])["classifier.kernel"])


def poison_steps(monkeypatch, steps, batch_size):
  """Training batches number `steps` (1-based) get NaN example weights, so their loss is NaN."""
  real, seen = batching.collate, []

  def collate(data, rows, size, *args):
    batch = real(data, rows, size, *args)
    if size == batch_size:
      seen.append(1)
      if len(seen) in steps:
        batch["weights"] = np.full_like(batch["weights"], np.nan)
    return batch

  monkeypatch.setattr(batching, "collate", collate)


@pytest.fixture
def nan_cfg(tiny_bert_dir, reviews, tmp_path):
  path = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews,
                      train={"max_steps": 6, "eval_every": 0, "eval_batch_size": 16},
                      checkpoint={"save_every": 2, "keep_last": 5})
  return lambda *overrides: config.load(path, list(overrides))


def test_nonfinite_stop_keeps_the_good_checkpoints_and_names_the_step(nan_cfg, tmp_path, monkeypatch):
  poison_steps(monkeypatch, {3}, 8)
  with pytest.raises(errors.Stopped, match=r"step 3: the loss is nan; the run stopped") as stopped:
    loop.fit(nan_cfg(), tmp_path / "run")
  assert stopped.value.code == errors.EXIT_NONFINITE == 3
  assert Checkpoints(tmp_path / "run", read_only=True).steps() == [2]  # nothing saved at or after the NaN step
  assert not (tmp_path / "run" / ".lock").exists()


def test_nonfinite_skip_drops_the_update_logs_it_and_stops_after_n_in_a_row(nan_cfg, tmp_path, monkeypatch):
  poison_steps(monkeypatch, {3}, 8)
  loop.fit(nan_cfg("train.nonfinite=skip"), tmp_path / "once")
  log = records(tmp_path / "once")
  assert [r["step"] for r in log if r.get("event") == "skipped_update"] == [3]
  (nan_record,) = [r for r in log if r.get("step") == 3 and "loss" in r]
  assert nan_record["loss"] is None  # NaN written as JSON null
  def strict(constant):
    raise AssertionError(f"{constant} is not JSON")
  for line in (tmp_path / "once" / "metrics.jsonl").open():
    json.loads(line, parse_constant=strict)
  assert Checkpoints(tmp_path / "once", read_only=True).steps() == [2, 4, 6]
  poison_steps(monkeypatch, {2, 3, 4}, 8)
  with pytest.raises(errors.Stopped, match=r"step 3: the loss was nan for 2 steps in a row") as stopped:
    loop.fit(nan_cfg("train.nonfinite=skip", "train.nonfinite_max_skips=2"), tmp_path / "twice")
  assert stopped.value.code == 3
  assert Checkpoints(tmp_path / "twice", read_only=True).steps() == [2]


def test_the_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tiny_bert_dir, reviews, tmp_path, capsys):
  cfg = config.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 2}))
  run = tmp_path / "run"
  run.mkdir()
  lock = run / rundir.LOCK
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # alive: pytest's parent
  with pytest.raises(UserError, match=rf"is in use by process {os.getppid()} on {socket.gethostname()}"):
    loop.fit(cfg, run)
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # cannot be checked from here: refused too
  with pytest.raises(UserError, match="in use by process 1 on elsewhere"):
    loop.fit(cfg, run)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
  loop.fit(cfg, run)
  assert f"removing the stale lock {lock} of process {gone.pid}" in capsys.readouterr().err
  assert not lock.exists() and Checkpoints(run, read_only=True).steps() == [2]


def test_a_first_signal_asks_to_stop_a_second_ctrl_c_interrupts():
  stop, before = loop.StopRequests(), signal.getsignal(signal.SIGINT)
  with stop.active():
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before  # restored


def test_time_based_saves(nan_cfg, tmp_path):
  """checkpoint.save_every_minutes saves whenever that long has passed, whatever save_every says."""
  loop.fit(nan_cfg("checkpoint.save_every=100", "checkpoint.save_every_minutes=1e-9"), tmp_path / "often")
  assert Checkpoints(tmp_path / "often", read_only=True).steps() == [2, 3, 4, 5, 6]  # keep_last 5
  loop.fit(nan_cfg("checkpoint.save_every=100", "checkpoint.save_every_minutes=0"), tmp_path / "never")
  assert Checkpoints(tmp_path / "never", read_only=True).steps() == [6]  # the last step only
