"""Two processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo), stopped from outside mid-training.

SIGTERM to one process, then (resumed) to both: each time the processes agree on one step, save it once and all
exit 75; each resume logs the uninterrupted run's losses bitwise (the same 2-process program on the same data).
SIGKILL of one process: the other prints one line naming the dead process and the last checkpoint and exits 75
within the peer timeout (JAXTUNE_PEER_TIMEOUT_S, 5 s here) instead of waiting in a collective.

One uninterrupted reference run, started in the background by a module fixture, overlaps the first interrupted
runs; every run shares one compile cache. The run that is SIGKILLed resumes the SIGTERMed ones, so its steps
before the kill check the resume after the SIGTERM to both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, reached, records, train_steps, with_devices
from test_multihost import free_port

from jaxtune import distributed
from jaxtune.distributed import PEER_TIMEOUT_VAR, PeerWatch
from jaxtune.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from jaxtune.train.checkpoints import Checkpoints

STEPS = 16
TIMEOUT = 5  # JAXTUNE_PEER_TIMEOUT_S of every run here
XLA_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")  # XLA's own log lines (compile warnings), not jaxtune's


class Job:
  """scripts/finetune.py as processes 0 and 1 of a 2-process job, stderr and stdout in files."""

  def __init__(self, cfg: Path, run_dir: Path, *args: str):
    self.port = port = free_port()
    self.procs: list[tuple[subprocess.Popen, Path]] = []
    self.ended: list[float | None] = [None, None]
    for pid in range(2):
      env = {**os.environ, "XLA_FLAGS": with_devices(4), PEER_TIMEOUT_VAR: str(TIMEOUT),
             "JAXTUNE_COORDINATOR": f"127.0.0.1:{port}", "JAXTUNE_NUM_PROCESSES": "2", "JAXTUNE_PROCESS_ID": str(pid)}
      err = Path(f"{run_dir}.{pid}.err")
      with open(f"{run_dir}.{pid}.out", "w") as out, open(err, "w") as err_file:
        self.procs.append((subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(cfg), "--run-dir", str(run_dir),
             "--quiet", *args], cwd=REPO, env=env, stdout=out, stderr=err_file), err))

  def signal_when(self, ready, sig: int, *pids: int) -> float:
    """Sends `sig` to processes `pids` once ready() holds; returns when it was sent (time.monotonic)."""
    deadline = time.monotonic() + 600
    while not ready():
      assert all(p.poll() is None for p, _ in self.procs), f"a process ended before the signal: {self.errs()}"
      assert time.monotonic() < deadline
      time.sleep(0.002)
    for pid in pids:
      self.procs[pid][0].send_signal(sig)
    return time.monotonic()

  def wait(self, timeout: float = 600) -> list[int]:
    """Exit codes; each process's exit time (time.monotonic) goes to self.ended."""
    return wait_all([self], timeout)[0]

  def poll(self) -> bool:
    """Notes the exit times of processes that ended; whether all have."""
    for i, (p, _) in enumerate(self.procs):
      if self.ended[i] is None and p.poll() is not None:
        self.ended[i] = time.monotonic()
    return None not in self.ended

  def errs(self) -> list[str]:
    return [err.read_text() for _, err in self.procs]

  def coordinator_gone(self, within: float) -> bool:
    """Whether process 0's coordination-service process (jaxtune/coordinator.py) has exited, waiting `within` s."""
    deadline = time.monotonic() + within
    while True:
      found = False
      for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
          args = cmdline.read_bytes().split(b"\0")
        except OSError:  # it exited meanwhile
          continue
        found |= b"jaxtune.coordinator" in args and f"[::]:{self.port}".encode() in args
      if not found or time.monotonic() > deadline:
        return not found
      time.sleep(0.1)


def wait_all(jobs: list[Job], timeout: float) -> list[list[int]]:
  """Waits for every process of `jobs` at once (exit times exact for each); their exit codes."""
  deadline = time.monotonic() + timeout
  try:
    while not all([job.poll() for job in jobs]):
      assert time.monotonic() < deadline, f"still running after {timeout} s: {[job.errs() for job in jobs]}"
      time.sleep(0.01)
  finally:
    for job in jobs:
      for p, _ in job.procs:  # one process failing must not leave the other behind
        p.kill()
  return [[p.returncode for p, _ in job.procs] for job in jobs]


def jaxtune_lines(err: str) -> list[str]:
  """stderr without XLA's own log lines (the SPMD partitioner's compile warnings)."""
  return [line for line in err.splitlines() if line.strip() and not XLA_LOG.match(line)]


def losses(run_dir: Path) -> dict[int, tuple[float, float, float]]:
  return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in records(run_dir) if "loss" in r
          and "split" not in r}


# The two-process jobs (~4 min of CI) are slow-tier: tests/test_multihost.py trains two processes against one, and
# the peer watch's logic runs in-process below (test_a_lost_peer_outside_the_training_loop_..., the timeouts).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def job(multihost_config, tmp_path_factory):
  """(config, the args of every run here, a function returning the finished reference run's dir). The reference
  (no interruption) trains in the background meanwhile."""
  d = tmp_path_factory.mktemp("faults")
  args = (f"train.max_steps={STEPS}", "train.eval_every=100", "checkpoint.save_every=100",
          "checkpoint.save_every_minutes=0", "mesh.data=4", "mesh.fsdp=2", f"train.compile_cache={d / 'xla'}")
  reference = Job(multihost_config, d / "reference", *args)

  def finished() -> Path:
    assert reference.wait() == [0, 0], reference.errs()
    assert reference.coordinator_gone(within=5)  # it leaves with process 0
    assert train_steps(d / "reference") == list(range(1, STEPS + 1))
    return d / "reference"

  yield multihost_config, args, finished
  reference.wait()


@pytest.fixture(scope="module")
def stopped(job, tmp_path_factory):
  """One run SIGTERMed twice: process 1 alone after step 2, then (resumed) both after 3 more steps. For each
  stop: (exit codes, stderr of both, the checkpoint steps after it)."""
  cfg, args, _ = job
  run = tmp_path_factory.mktemp("stopped") / "run"
  out = []
  for starts, (after, pids) in enumerate([(2, (1,)), (None, (0, 1))], 1):
    after = after or out[-1][2][-1] + 3
    proc = Job(cfg, run, *args, *(("--resume",) if starts > 1 else ()))
    proc.signal_when(lambda: reached(run, after, starts, saved=False), signal.SIGTERM, *pids)
    codes = proc.wait()
    out.append((codes, proc.errs(), Checkpoints(run, read_only=True).steps()))
  return run, out


def assert_stopped(codes: list[int], errs: list[str], checkpoints: list[int], before: list[int]) -> int:
  """Both exited 75 with `stopped at step N; resume with --resume`, N the same and the one new checkpoint."""
  assert codes == [EXIT_PREEMPTED] * 2, errs
  # (cli names the file third-party log records went to, if any: Orbax's warnings on a resume)
  found = [re.fullmatch(r"stopped at step (\d+); resume with --resume( \(details: .*\))?", jaxtune_lines(err)[-1])
           for err in errs]
  assert all(found) and found[0][1] == found[1][1], errs
  step = int(found[0][1])
  assert checkpoints == [*before, step], (checkpoints, step)  # saved once, at the step both stopped at
  for err in errs:
    assert "Traceback" not in err and "error" not in " ".join(jaxtune_lines(err)).lower(), err
  return step


@SLOW
def test_sigterm_to_one_process_stops_both_at_one_saved_step_and_resumes_exactly(job, stopped):
  run, [(codes, errs, checkpoints), (_, _, later)] = stopped
  step = assert_stopped(codes, errs, checkpoints, [])
  assert step >= 3
  assert "SIGTERM: stopping after this step" in errs[1] and "SIGTERM" not in errs[0]  # process 0 was not signalled
  assert later[0] == step
  # The resumed run logged the reference's loss, gradient norm and learning rate at every step, bitwise.
  want, got = losses(job[2]()), losses(run)
  assert sorted(got) == list(range(1, later[-1] + 1)) and later[-1] > step
  assert {s: got[s] for s in got} == {s: want[s] for s in got}


@SLOW
def test_sigterm_to_both_processes_stops_both_at_one_saved_step(stopped):
  _, [(_, _, first), (codes, errs, checkpoints)] = stopped
  step = assert_stopped(codes, errs, checkpoints, first)
  assert step >= first[-1] + 3
  assert all("SIGTERM: stopping after this step" in err for err in errs)


@pytest.fixture(scope="module")
def lost_peer(job, stopped, tmp_path_factory):
  """Three resumes of the run SIGTERMed twice, side by side: in one process 1 is SIGKILLed 2 steps in, in one
  process 0 (which started the coordination service), in the third process 1 leaves on its own (a second Ctrl-C:
  KeyboardInterrupt). For each: (run dir, the last checkpoint before, exit codes, stderr of both, seconds from the
  signal to the survivor's exit, the job)."""
  cfg, args, _ = job
  runs = {}
  for name in ("killed", "coordinator_killed", "interrupted"):
    run = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(stopped[0], run)
    runs[name] = run, Checkpoints(run, read_only=True).steps()[-1], Job(cfg, run, *args, "--resume")
  run, last, proc = runs["killed"]
  killed = proc.signal_when(lambda: reached(run, last + 2, 3, saved=False), signal.SIGKILL, 1)
  run, last, proc = runs["coordinator_killed"]
  coordinator_killed = proc.signal_when(lambda: reached(run, last + 2, 3, saved=False), signal.SIGKILL, 0)
  run, last, proc = runs["interrupted"]
  proc.signal_when(lambda: reached(run, last + 2, 3, saved=False), signal.SIGINT, 1)
  interrupted = proc.signal_when(lambda: "SIGINT: stopping" in proc.errs()[1], signal.SIGINT, 1)
  codes = wait_all([proc for _, _, proc in runs.values()], 120)
  survivor = {"killed": 0, "coordinator_killed": 1, "interrupted": 0}
  return {name: (run, last, code, proc.errs(), proc.ended[survivor[name]] - sent, proc)
          for (name, (run, last, proc)), code, sent in zip(runs.items(), codes, (killed, coordinator_killed,
                                                                                   interrupted))}


def assert_resumed_exactly(run: Path, last: int, reference: Path) -> None:
  """The steps the run trained after resuming from step `last` are the reference's, bitwise."""
  want, got = losses(reference), losses(run)
  assert max(got) >= last + 2
  assert {s: got[s] for s in got} == {s: want[s] for s in got}


@SLOW
def test_sigkill_of_one_process_ends_the_other_with_one_line_within_the_peer_timeout(job, lost_peer):
  run, last, codes, errs, elapsed, _ = lost_peer["killed"]
  assert codes == [EXIT_PREEMPTED, -signal.SIGKILL], errs
  # One line, no traceback, within the peer timeout and the watch's slack (measured: about TIMEOUT + 1 s).
  assert jaxtune_lines(errs[0]) == [f"error: process 1 of 2 stopped responding (no heartbeat for {TIMEOUT} s); "
                                    f"the last checkpoint is step {last}; rerun with --resume"], errs[0]
  assert TIMEOUT - 2 < elapsed < TIMEOUT + PeerWatch.slack(TIMEOUT), elapsed
  print(f"process 0 left {elapsed:.1f} s after process 1 was killed")
  assert "Traceback" not in errs[0]
  assert not (run / ".lock").exists()  # released before leaving: the rerun needs no stale-lock take-over
  assert Checkpoints(run, read_only=True).steps()[-1] == last
  assert_resumed_exactly(run, last, job[2]())  # the resume after the SIGTERM to both


@SLOW
def test_sigkill_of_process_0_ends_the_other_with_one_line_too(job, lost_peer):
  """Process 0 started JAX's coordination service in a process of its own, which outlives it: process 1 reads the
  verdict there (before: JAX's client aborted it at once, SIGABRT and a C++ stack trace, exit 134)."""
  run, last, codes, errs, elapsed, proc = lost_peer["coordinator_killed"]
  assert codes == [-signal.SIGKILL, EXIT_PREEMPTED], errs
  assert jaxtune_lines(errs[1]) == [f"error: process 0 of 2 (the coordinator) stopped responding (no heartbeat for "
                                    f"{TIMEOUT} s); the last checkpoint is step {last}; rerun with --resume"], errs[1]
  assert TIMEOUT - 2 < elapsed < TIMEOUT + PeerWatch.slack(TIMEOUT), elapsed
  print(f"process 1 left {elapsed:.1f} s after process 0 was killed")
  assert "Traceback" not in errs[1] and "SIGABRT" not in errs[1]
  assert not proc.coordinator_gone(within=0)  # it outlived process 0 (and leaves after its grace: the test below)
  assert Checkpoints(run, read_only=True).steps()[-1] == last


@SLOW
def test_a_process_leaving_on_its_own_ends_the_other_at_once_and_keeps_its_exit_code(job, lost_peer):
  run, last, codes, errs, elapsed, _ = lost_peer["interrupted"]
  assert codes == [EXIT_PREEMPTED, EXIT_INTERRUPTED], errs
  assert jaxtune_lines(errs[0]) == [f"error: process 1 of 2 left the run (its own output says why); the last "
                                    f"checkpoint is step {last}; rerun with --resume"], errs[0]
  assert jaxtune_lines(errs[1])[-1].startswith("interrupted; nothing more was saved"), errs[1]
  # Process 0 met process 1 in JAX's shutdown barrier, so neither was aborted (before: both, after 300 s).
  assert elapsed < PeerWatch.slack(TIMEOUT), elapsed
  print(f"process 0 left {elapsed:.1f} s after process 1's second Ctrl-C")
  for err in errs:
    assert "Traceback" not in err and "Terminating process" not in err, err
  assert Checkpoints(run, read_only=True).steps()[-1] == last
  assert_resumed_exactly(run, last, job[2]())


@pytest.mark.parametrize(("value", "heartbeat"), [("", 100), ("5", 100), ("70", 100), ("100", 130)])
def test_the_peer_timeout_comes_from_the_environment_and_stays_below_jax_own(monkeypatch, value, heartbeat):
  """JAX aborts every process once its own heartbeat (100 s) times out: a longer peer timeout raises it."""
  monkeypatch.setenv(PEER_TIMEOUT_VAR, value)
  assert distributed.peer_timeout() == int(value or distributed.PEER_TIMEOUT_S)
  assert distributed.jax_heartbeat(distributed.peer_timeout()) == heartbeat


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "soon"])
def test_a_bad_peer_timeout_is_a_user_error(monkeypatch, value):
  monkeypatch.setenv(PEER_TIMEOUT_VAR, value)
  monkeypatch.setattr(distributed, "Coordinator", lambda *a, **k: pytest.fail("started despite the error"))
  with pytest.raises(UserError, match=PEER_TIMEOUT_VAR):
    distributed._join("127.0.0.1:1", 2, 0, [])


@pytest.mark.parametrize(("failure", "waits"), [
    (RuntimeError("Gloo all-reduce failed: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
    (ValueError("a bug of our own"), False)])
def test_a_lost_peer_outside_the_training_loop_gets_the_watch_line_alone(monkeypatch, capsys, failure, waits):
  """Loading, the first compile or the final evaluation: a collective that failed as a peer died waits for the
  watch's verdict (the one line, exit 75) instead of printing `an unexpected failure` first; other errors don't."""
  from jaxtune import cli

  class Watch:
    def await_verdict(self) -> None:  # the real one ends the process with os._exit once the verdict comes
      print("error: process 1 of 2 stopped responding", file=sys.stderr)
      raise SystemExit(EXIT_PREEMPTED)

  monkeypatch.setenv("JAXTUNE_NO_HOST_TUNING", "1")
  monkeypatch.setattr(distributed, "WATCH", Watch())

  def main() -> None:
    raise failure

  with pytest.raises(SystemExit) as exited:
    cli.run(main)
  err = capsys.readouterr().err
  if waits:
    assert (exited.value.code, err) == (EXIT_PREEMPTED, "error: process 1 of 2 stopped responding\n")
  else:
    assert exited.value.code == 1 and err.startswith("error: an unexpected failure, ValueError: a bug of our own")


def test_the_coordination_service_leaves_at_once_after_done_else_after_its_grace():
  """Process 0 writes `done` once every process passed JAX's shutdown barrier: its exit (the pipe closing) ends the
  service at once. Without `done` process 0 died, and the service stays its grace for the others to leave."""
  from jaxtune.coordinator import Coordinator

  for done, grace in ((True, 30), (False, 2)):
    service = Coordinator(f"[::]:{free_port()}", 2, 100, 300, grace)
    if done:
      service.done()
    started = time.monotonic()
    service.stdin.close()  # as when process 0 exits
    service.proc.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert (elapsed < 1.5) if done else (grace <= elapsed < grace + 5), (done, elapsed)


def test_a_coordination_service_that_cannot_start_is_one_user_error():
  from jaxtune.coordinator import Coordinator

  said = r"could not start on 256\.1\.1\.1:99999 \(.*(Failed to start RPC server|Address lookup failed)"
  with pytest.raises(UserError, match=said):
    Coordinator("256.1.1.1:99999", 2, 100, 300, 5)
