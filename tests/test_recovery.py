"""Kills, signals and damaged checkpoints: a resumed run equals an uninterrupted one bitwise.

Every run here is a real scripts/finetune.py process on the tiny BERT (dropout on, 12 steps across
an epoch boundary, a checkpoint every 2 steps) sharing one compile cache, so only the first compiles.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import final_params, finetune, reached, records, stop_when, train_steps

from jaxtune.errors import EXIT_PREEMPTED
from jaxtune.eval import evaluate
from jaxtune.train.checkpoints import Checkpoints

STEPS = 12


def partial_writes(run_dir: Path) -> set[str]:
  """Orbax's temp dirs of checkpoint writes in flight (or cut short by a kill)."""
  ckpt_dir = run_dir / "checkpoints"
  return {p.name for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name} if ckpt_dir.is_dir() else set()


def assert_same_run(run_dir: Path, reference: Path) -> None:
  """Final params bitwise equal; each step's loss record once and equal; equal eval records."""
  want, got = final_params(reference), final_params(run_dir)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(want[path], got[path], err_msg=path)
  assert train_steps(run_dir) == list(range(1, STEPS + 1))
  pick = lambda d, keys: [{k: r[k] for k in keys} for r in records(d) if "loss" in r and keys[-1] in r]
  assert pick(run_dir, ("step", "loss", "grad_norm", "lr")) == pick(reference, ("step", "loss", "grad_norm", "lr"))
  assert pick(run_dir, ("step", "loss", "accuracy")) == pick(reference, ("step", "loss", "accuracy"))


def test_sigkill_anywhere_then_resume_equals_no_interruption(resumable_job, tmp_path):
  cfg, reference = resumable_job
  run = tmp_path / "run"
  rng = np.random.default_rng(9)
  first = int(rng.integers(3, 10))
  # a kill at a seeded random moment after a step was logged, the next in the middle of a checkpoint write
  code, err = stop_when(finetune(cfg, run), lambda: reached(run, first, 1), signal.SIGKILL, rng.uniform(0, 0.05))
  assert code == -signal.SIGKILL, err[-2000:]
  for _ in range(3):  # the second kill lands while a checkpoint write is in flight (again if the write won the race)
    old = partial_writes(run)
    code, err = stop_when(finetune(cfg, run, "--resume"), lambda: partial_writes(run) - old, signal.SIGKILL)
    assert code == -signal.SIGKILL, err[-2000:]
    if partial_writes(run) - old:
      break
  else:
    pytest.fail("no kill landed inside a checkpoint write")
  done = finetune(cfg, run, "--resume")
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert "removing the stale lock" in err  # the killed process's lock was taken over
  assert not partial_writes(run)  # the cut-short write was cleaned up
  assert not (run / ".lock").exists()
  assert_same_run(run, reference)


def test_sigterm_and_ctrl_c_save_exit_75_and_resume_exactly(resumable_job, tmp_path):
  cfg, reference = resumable_job
  run = tmp_path / "run"
  rare = ("checkpoint.save_every=100",)  # so the only checkpoints before the end are the signals'
  for starts, (sig, after, args) in enumerate([(signal.SIGTERM, 4, rare), (signal.SIGINT, 8, ("--resume", *rare))], 1):
    code, err = stop_when(finetune(cfg, run, *args), lambda: reached(run, after, starts, saved=False), sig)
    assert code == EXIT_PREEMPTED, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped at step ") and line.endswith("; resume with --resume"), err[-2000:]
    step = int(line.split()[3].rstrip(";"))
    assert Checkpoints(run, read_only=True).steps()[-1] == step >= after
    assert "Traceback" not in err
  done = finetune(cfg, run, "--resume", *rare)
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert_same_run(run, reference)


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(resumable_job, tmp_path, capsys):
  cfg, reference = resumable_job
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  damaged = [p for p in (run / "checkpoints" / str(STEPS) / "params").rglob("*") if p.is_file() and p.stat().st_size]
  for p in damaged:  # every data and metadata file of the last step's params, truncated
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  result = evaluate.evaluate_checkpoint(run, "latest", split="test")
  assert result["step"] == STEPS - 2
  assert f"skipping checkpoint step {STEPS}" in capsys.readouterr().err
  done = finetune(cfg, run, "--resume")
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert f"skipping checkpoint step {STEPS}" in err and f"moved the unreadable checkpoint step {STEPS}" in err
  assert (run / "checkpoints.unreadable" / str(STEPS)).is_dir()
  assert_same_run(run, reference)
