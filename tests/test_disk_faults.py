"""Fault injection: a disk that fills up or turns read-only while finetune.py runs, and checkpoints that do not read
back for evaluate.py and --resume. Each case checks the exit code, the one line printed, and what is on disk.

The run dir lives on a small tmpfs this test mounts (the machine runs tests as root); where mounting is refused,
the disk cases inject the same OSError at the write layer instead (tests/faultinject.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, records, run_in_process, write_config

from jaxtune import config, tasks
from jaxtune.train.checkpoints import Checkpoints

FAULTS = Path(__file__).with_name("faultinject.py")


def mount_tmpfs(path: Path, size: str) -> bool:
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0 or shutil.which("mount") is None:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
  """(a 64 MB tmpfs dir, room for three checkpoints of the tiny model, or None where it cannot be mounted)."""
  where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
  mounted = mount_tmpfs(where, "64m")
  yield where if mounted else None
  if mounted:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def job(tiny_bert_dir, reviews, tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("disk_faults")
  return write_config(d / "c.yaml", tiny_bert_dir, reviews,
                      train={"max_steps": 12, "eval_every": 0, "tensorboard": False, "compile_cache": str(d / "xla")},
                      checkpoint={"save_every": 5, "save_every_minutes": 0})


def start(job: Path, run_dir: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
  command = [sys.executable, *([str(FAULTS), fault] if fault else []), str(REPO / "scripts" / "finetune.py"),
             "--config", str(job), "--run-dir", str(run_dir), "--quiet", *args]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def logged_step(run_dir: Path) -> int:
  try:
    return max((r.get("step", 0) for r in records(run_dir) if "loss" in r), default=0)
  except (OSError, ValueError):
    return 0


def when_step(proc: subprocess.Popen, run_dir: Path, step: int, action) -> tuple[int, str]:
  """Runs `action()` once the run has logged `step`, then waits for the process: (exit code, stderr)."""
  deadline = time.monotonic() + 300
  while logged_step(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  action()
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  return lines[0]


def leftovers(run_dir: Path) -> list[str]:
  """Half-written files: Orbax temp dirs and our own temp files."""
  return sorted(p.name for p in run_dir.rglob("*") if "orbax-checkpoint-tmp" in p.name or ".tmp-" in p.name)


def once_committed(proc: subprocess.Popen, run_dir: Path, step: int, then) -> None:
  """Waits for checkpoint `step` to commit (its dir renamed into place), then runs `then()`."""
  while not (run_dir / "checkpoints" / str(step)).is_dir() and proc.poll() is None:
    time.sleep(0.02)
  then()


def fill(disk: Path) -> None:
  """Fills `disk` to its last byte; it may be full already (even too full to open a new file)."""
  with pytest.raises(OSError, match="No space left"):
    with open(disk / "filler", "wb") as f:
      while True:
        f.write(b"\0" * 65536)
        f.flush()


def test_a_disk_that_fills_during_a_checkpoint_write(job, small_disk, tmp_path):
  run_dir = (small_disk or tmp_path) / "run"
  fault = None if small_disk else "ENOSPC:checkpoint:2"  # the second checkpoint write fails
  proc = start(job, run_dir, fault=fault)
  code, err = when_step(proc, run_dir, 6, lambda: once_committed(proc, run_dir, 5,
                                                                 lambda: small_disk and fill(small_disk)))
  line = one_line(err)
  assert code == 2, err
  assert f"writing a checkpoint to {run_dir / 'checkpoints'} failed: No space left on device (ENOSPC)" in line
  assert "the partial 10.orbax-checkpoint-tmp" in line and "was removed" in line
  assert "the checkpoints of steps [5] are kept" in line and "rerun with --resume" in line
  assert line.endswith(f"(details: {run_dir / 'details.log'})") or "details: " in line
  assert Checkpoints(run_dir, read_only=True).steps() == [5] and not leftovers(run_dir)
  assert not (run_dir / ".lock").exists() and (run_dir / "config.yaml").is_file()
  if small_disk:
    (small_disk / "filler").unlink()
  resumed = start(job, run_dir, "--resume")
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert Checkpoints(run_dir, read_only=True).steps() == [10, 12] and not leftovers(run_dir)


@pytest.mark.slow  # the full-disk path is test_a_disk_that_fills_during_a_checkpoint_write's; this one the log's
def test_a_disk_that_fills_during_a_metrics_write(job, tmp_path):
  """Between checkpoints: the record that does not fit is not half-written, the earlier log and checkpoint stay.

  Injected (the 8th append writes half its record, as a write cut short by a full disk does), not a filled tmpfs:
  there the small appends can go on landing in the file's last, already allocated page, so which write met the full
  disk first, a record or the final checkpoint, was most likely a race (the CI failure this replaced)."""
  run_dir = tmp_path / "run"
  # the records of steps 0 (start) to 6 land, step 7's is cut short
  proc = start(job, run_dir, "checkpoint.save_every=5", "train.max_steps=9", fault="ENOSPC:metrics:8")
  _, err = proc.communicate(timeout=300)
  code = proc.returncode
  line = one_line(err)
  assert code == 2, err
  assert "No space left on device" in line and str(run_dir) in line
  log = (run_dir / "metrics.jsonl").read_text()
  assert log.endswith("\n") and [r.get("step") for r in records(run_dir) if "loss" in r][:6] == [1, 2, 3, 4, 5, 6]
  assert Checkpoints(run_dir, read_only=True).steps() == [5] and not leftovers(run_dir)


def test_a_file_system_turned_read_only_mid_run(job, small_disk, tmp_path):
  run_dir = (small_disk or tmp_path) / "run"
  if small_disk is None:
    fault = "EROFS:checkpoint:2"
    remount = lambda: None  # noqa: E731
  else:
    fault = None
    disk = small_disk

    def remount():  # refused (busy) while a file there is open for writing: a metrics append, a checkpoint file
      for _ in range(200):
        if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0:
          return
        time.sleep(0.01)
      raise AssertionError(f"could not remount {disk} read-only")
  proc = start(job, run_dir, fault=fault)
  code, err = when_step(proc, run_dir, 6, lambda: once_committed(proc, run_dir, 5, remount))
  line = one_line(err)
  assert code == 2, err
  if f"{run_dir / 'metrics.jsonl'}: Read-only file system" in line:  # the log's next append met it before the
    assert "check that the path exists, is writable" in line  # next checkpoint did (the run was slower this time)
  else:
    assert "Read-only file system (EROFS)" in line and "the checkpoints of steps [5] are kept" in line
    assert "make its file system writable, then rerun with --resume" in line
  assert Checkpoints(run_dir, read_only=True).steps() == [5]  # resuming from it: the full-disk case above
  if small_disk is not None:
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)


# --- checkpoints that do not read back ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(job, tmp_path_factory) -> Path:
  """A 10-step run with checkpoints at 5 and 10, validated at each (so `best` is defined)."""
  run_dir = tmp_path_factory.mktemp("trained") / "run"
  proc = start(job, run_dir, "train.max_steps=10", "train.eval_every=5", "checkpoint.keep_last=2")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  return run_dir


def damaged_copy(trained: Path, step: int, tmp_path: Path) -> Path:
  """A copy of the run whose step's largest params data file is cut to half its size."""
  run_dir = tmp_path / "damaged"
  shutil.copytree(trained, run_dir)
  data = max((run_dir / "checkpoints" / str(step) / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(data.stat().st_size // 2)
  return run_dir


def best_step(run_dir: Path) -> int:
  cfg = tasks.checkpoint_config(config.load(run_dir / "config.yaml"))  # classification: the best accuracy
  return Checkpoints(run_dir, cfg, read_only=True).resolve("best")


@pytest.mark.parametrize("which", ["number", "best"])
def test_evaluate_a_named_checkpoint_that_does_not_read_back(which, trained, tmp_path, monkeypatch, capsys):
  step = 5 if which == "number" else best_step(trained)
  run_dir = damaged_copy(trained, step, tmp_path)
  before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
  details = Path("details.log")  # Orbax's own error records of the failed read
  code, err = run_in_process("evaluate", "--checkpoint", run_dir, "--step", str(step) if which == "number" else "best",
                             monkeypatch=monkeypatch, capsys=capsys)
  line = one_line(err)
  assert code == 2
  assert f"checkpoint step {step} in {run_dir / 'checkpoints'} does not read back" in line
  assert "its files are damaged; use --step latest" in line
  after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.relative_to(run_dir) != details)
  assert after == before  # nothing moved, nothing written but the details


def test_evaluate_latest_and_resume_skip_a_damaged_newest_checkpoint(trained, tmp_path, monkeypatch, capsys, job):
  run_dir = damaged_copy(trained, 10, tmp_path)
  code, err = run_in_process("evaluate", "--checkpoint", run_dir, "--step", "latest", monkeypatch=monkeypatch,
                             capsys=capsys)
  assert code == 0 and "Traceback" not in err
  (warning,) = err.strip().splitlines()
  assert warning.startswith(f"warning: skipping checkpoint step 10 in {run_dir / 'checkpoints'}")
  assert (run_dir / "eval" / "test-5.json").is_file()
  proc = start(job, run_dir, "--resume", "--extend", "train.max_steps=11")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Traceback" not in err, err
  assert [line for line in err.strip().splitlines() if line.startswith("warning:")] == [
      f"warning: skipping checkpoint step 10 in {run_dir / 'checkpoints'}, which does not read back "
      f"({err.split('which does not read back (')[1].splitlines()[0]}",
      f"warning: moved the unreadable checkpoint step 10 to {run_dir / 'checkpoints.unreadable' / '10'}"]
  assert Checkpoints(run_dir, read_only=True).steps() == [10, 11]  # step 10 trained again from 5
  assert (run_dir / "checkpoints.unreadable" / "10").is_dir()


def test_evaluate_a_run_whose_saved_tokenizer_is_damaged(trained, tmp_path, monkeypatch, capsys):
  run_dir = tmp_path / "run"
  shutil.copytree(trained, run_dir)
  (run_dir / "tokenizer" / "tokenizer.json").write_text("{")
  code, err = run_in_process("evaluate", "--checkpoint", run_dir, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 2
  assert one_line(err).startswith(f"error: the run's tokenizer {run_dir / 'tokenizer'} does not load (JSONDecodeError")
  assert not (run_dir / "eval").exists()
