"""Run directories on object storage, for real: scripts/finetune.py and evaluate.py against a local S3 server (moto)
and a local GCS emulator, each run a real process on the tiny BERT.

s3://: a kill in the middle of a queued checkpoint write, a SIGTERM and two resumes end bitwise equal to an
uninterrupted local run, each step logged once; evaluate.py reads the run from the bucket. A missing bucket,
refused credentials and an unreachable store are one error line each; the store going away in the middle of
a run stops it with exit 75, keeping every committed checkpoint, and --resume finishes it once the store is back.
gs://: the same code path end to end (a run equal to the local one, a resume, evaluate.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import objstore
import pytest
from conftest import REPO, final_params, finetune, records, run_script, train_steps
from objstore import gcs_fixture, gcs_server_fixture, s3_fixture, s3_server_fixture  # noqa: F401

from jaxtune import storage
from jaxtune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from jaxtune.train.checkpoints import Checkpoints

STEPS = 12


def step_dirs(run: storage.epath.Path) -> tuple[set[int], set[int]]:
  """(committed, in flight) checkpoint steps: on a store a step dir without commit_success.txt is a write in
  progress (or one cut short by a kill)."""
  names = storage.files(run / "checkpoints") if (run / "checkpoints").exists() else []
  present = {int(n.split("/")[0]) for n in names if n.split("/")[0].isdigit()}
  committed = {int(n.split("/")[0]) for n in names if n.count("/") == 1 and n.endswith("/commit_success.txt")}
  return committed, present - committed


def assert_same_run(run: storage.epath.Path, reference) -> None:
  want, got = final_params(reference), final_params(run)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(want[path], got[path], err_msg=path)
  assert train_steps(run, (run / "metrics.jsonl").read_text().splitlines()) == list(range(1, STEPS + 1))
  pick = lambda d: [{k: r[k] for k in ("step", "loss", "lr")} for r in records(d) if "loss" in r and "lr" in r]
  assert pick(run) == pick(reference)


@pytest.mark.slow  # ~110 s; a store lost mid-run (test_s3_store_lost_mid_run_...) and local kills (test_recovery.py)
def test_s3_kill_in_a_queued_write_sigterm_resume_and_evaluate(resumable_job, s3):
  cfg, reference = resumable_job
  run = storage.path(s3.url(s3.bucket(), "runs", "tiny"))
  # SIGKILL from the relay at the 10th request into checkpoint 6: its write is under way, not committed
  relay = Relay(s3.endpoint, b"/checkpoints/6/", 10, lambda proc: proc.kill())
  code, err = relay.run(cfg, run)
  assert code == -signal.SIGKILL, err[-3000:]
  assert step_dirs(run) == ({2, 4}, {6})

  # SIGTERM at the first request into checkpoint 8: the resumed run stops after its step with a save, exit 75
  relay = Relay(s3.endpoint, b"/checkpoints/8/", 1, lambda proc: proc.send_signal(signal.SIGTERM))
  code, err = relay.run(cfg, run, "--resume")
  assert code == EXIT_PREEMPTED, err[-3000:]
  assert "removing the stale lock" in err  # the killed process's lock, taken over
  committed, in_flight = step_dirs(run)
  assert max(committed) >= 8 and not in_flight  # the cut-short write was cleaned up, SIGTERM's save committed

  done = finetune(cfg, run, "--resume")
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert step_dirs(run)[1] == set()
  assert not (run / ".lock").exists()
  for name in ("config.yaml", "summary.json", "timing.json", "tokenizer/tokenizer_config.json"):
    assert (run / name).exists(), name
  assert_same_run(run, reference)

  result = run_script("evaluate.py", "--checkpoint", str(run), "--split", "test")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (run / "eval" / f"test-{STEPS}.json").exists()
  exported = run_script("export_hf.py", "--checkpoint", str(run), "--output", str(reference.parent / "exported"))
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (reference.parent / "exported" / "config.json").is_file()
  assert (reference.parent / "exported" / "tokenizer.json").is_file()


def test_gs_run_and_evaluate(resumable_job, gcs):
  """The whole tiny run on gs:// gives the local reference's params bit for bit; evaluate reads it back from the
  bucket. (Resuming on gs:// is the slow test below; on s3:// the first test of this file resumes.)"""
  cfg, reference = resumable_job
  run = storage.path(gcs.url(gcs.bucket(), "runs", "whole"))
  done = finetune(cfg, run)
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert_same_run(run, reference)
  result = run_script("evaluate.py", "--checkpoint", str(run), "--split", "test", "--step", "best")
  assert result.returncode == 0, result.stderr[-3000:]
  assert list((run / "eval").iterdir())


@pytest.mark.slow  # four runs (78 s of CI); test_gs_run_and_evaluate keeps gs:// in the default run
def test_gs_run_resume_and_evaluate(resumable_job, gcs):
  cfg, reference = resumable_job
  run = storage.path(gcs.url(gcs.bucket(), "runs", "tiny"))
  first = finetune(cfg, run, "train.max_steps=6")  # then --extend to the reference's 12 (its schedule is rebuilt,
  _, err = first.communicate(timeout=600)          # so the params differ from it: compared to a local twin instead)
  assert first.returncode == 0, err[-3000:]
  assert Checkpoints(run, read_only=True).steps() == [4, 6]
  more = finetune(cfg, run, "--resume", "--extend")
  _, err = more.communicate(timeout=600)
  assert more.returncode == 0, err[-3000:]
  twin = reference.parent / "gs_twin"
  if not twin.exists():
    assert finetune(cfg, twin, "train.max_steps=6").wait(timeout=600) == 0
    assert finetune(cfg, twin, "--resume", "--extend").wait(timeout=600) == 0
  want, got = final_params(twin), final_params(run)
  for path in want:
    np.testing.assert_array_equal(want[path], got[path], err_msg=path)
  result = run_script("evaluate.py", "--checkpoint", str(run), "--split", "test", "--step", "best")
  assert result.returncode == 0, result.stderr[-3000:]
  assert list((run / "eval").iterdir())


class Relay:
  """A TCP relay between a finetune.py process and the store that acts on the process (or cuts the line) at the
  `nth` request whose line holds `pattern`: a moment inside a checkpoint write, hit exactly however slow the
  machine is (polling the bucket from outside lands anywhere on a loaded machine)."""

  def __init__(self, target: str, pattern: bytes, nth: int, action):
    host, port = target.removeprefix("http://").split(":")
    self.target, self.pattern, self.nth, self.action = (host, int(port)), pattern, nth, action
    self.server = socket.create_server(("127.0.0.1", 0))
    self.port = self.server.getsockname()[1]
    self.seen, self.lock, self.conns, self.cut_off = 0, threading.Lock(), [], False
    self.proc: subprocess.Popen | None = None
    threading.Thread(target=self._accept, daemon=True).start()

  def run(self, cfg, run_dir, *args: str) -> tuple[int, str]:
    """Runs finetune.py through the relay to its end: (exit code, stderr)."""
    endpoint = f"http://127.0.0.1:{self.port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_MAX_ATTEMPTS": "2"}
    self.proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(cfg),
                                  "--run-dir", str(run_dir), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    _, err = self.proc.communicate(timeout=600)
    assert self.seen >= self.nth, f"the run never reached request {self.nth} matching {self.pattern!r}"
    return self.proc.returncode, err

  def cut(self) -> None:
    """Drops every connection and refuses new ones: the store is gone."""
    self.cut_off = True
    self.server.close()
    for s in self.conns:
      with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)

  def _accept(self) -> None:
    while True:
      try:
        client, _ = self.server.accept()
        upstream = socket.create_connection(self.target)
      except OSError:
        return
      self.conns += [client, upstream]
      threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
      threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

  def _pipe(self, a: socket.socket, b: socket.socket, requests: bool) -> None:
    try:
      while (data := a.recv(65536)) and not self.cut_off:
        if requests and self.pattern in data.split(b"\r\n", 1)[0]:
          with self.lock:
            self.seen += 1
            if self.seen == self.nth:
              self.action(self.proc) if self.action is not None else self.cut()
        if not self.cut_off:
          b.sendall(data)
    except OSError:
      pass
    finally:
      for s in (a, b):
        with contextlib.suppress(OSError):
          s.shutdown(socket.SHUT_RDWR)


def test_s3_store_lost_mid_run_exits_75_keeps_checkpoints_and_resumes(resumable_job, s3):
  cfg, reference = resumable_job
  run = storage.path(s3.url(s3.bucket(), "runs", "lost"))
  relay = Relay(s3.endpoint, b"/checkpoints/6/", 1, None)  # the store goes away as checkpoint 6 starts
  code, err = relay.run(cfg, run)
  assert code == EXIT_PREEMPTED, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: writing to s3://") and "--resume" in errors[0], err[-3000:]
  assert step_dirs(run)[0] == {2, 4}  # every committed checkpoint kept
  assert Checkpoints(run, read_only=True).steps() == [2, 4]
  (run / "checkpoints" / "4" / "params" / "manifest.ocdbt").unlink()  # and the newest one damaged
  done = finetune(cfg, run, "--resume")  # the store is back (the direct endpoint)
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  assert "skipping checkpoint step 4" in err and "moved the unreadable checkpoint step 4" in err, err[-3000:]
  assert (run / "checkpoints.unreadable" / "4" / "commit_success.txt").exists()
  assert_same_run(run, reference)  # resumed from step 2, exactly


@pytest.mark.parametrize("case", ["missing bucket", "refused credentials", "unreachable store"])
def test_s3_bad_bucket_credentials_or_endpoint_is_one_error_line(resumable_job, s3, case, tmp_path, monkeypatch):
  cfg, _ = resumable_job
  bucket = "jaxtune-no-such-bucket" if case == "missing bucket" else s3.bucket()
  env = dict(os.environ)
  if case == "refused credentials":  # a second moto server that checks credentials (moto's IAM: none are known)
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server, endpoint = objstore._start("s3", tmp_path / "auth.log")
    env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = endpoint
  if case == "unreachable store":
    with socket.create_server(("127.0.0.1", 0)) as s:  # a port nobody listens on once closed
      port = s.getsockname()[1]
    env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{port}"
    env["AWS_MAX_ATTEMPTS"] = "1"
  url = s3.url(bucket, "runs", "x")
  try:
    result = run_script("finetune.py", "--config", cfg, "--run-dir", url, env=env)
  finally:
    if case == "refused credentials":
      objstore._stop(server)
  assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  want = {"missing bucket": "does not exist; create it", "refused credentials": "access refused",
          "unreachable store": "cannot be reached"}[case]
  assert line.startswith(f"error: run dir {url}: ") and want in line, line
