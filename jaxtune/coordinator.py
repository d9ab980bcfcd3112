"""JAX's coordination service in a process of its own, started by process 0 of a multi-process run.

jax.distributed.initialize runs the service inside process 0, so process 0's death took it down, and JAX's client
in every other process aborted at once (SIGABRT, a C++ stack trace, exit 134) before anything of jaxtune's could
speak. Hosted here, the service outlives a process 0 that is killed: the others' `PeerWatch` reads that process
0 stopped responding, prints its one line and leaves with exit 75 as for any other peer. (Process 0's host going
down still takes the service with it.)

`python -m jaxtune.coordinator BIND_ADDRESS PROCESSES HEARTBEAT_S SHUTDOWN_S GRACE_S`: prints `ready` once the
service listens, then reads its stdin, a pipe from process 0. Process 0 writes `done` once every process has
passed JAX's shutdown barrier (or left after a lost peer); when the pipe closes (process 0 exited) the service
stops at once after `done`, else after GRACE_S, the time the others need to notice and leave.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from jaxtune.errors import UserError

READY = "ready"
DONE = "done"


class Coordinator:
  """The service's process, seen from process 0."""

  def __init__(self, bind_address: str, processes: int, heartbeat_s: int, shutdown_s: int, grace_s: int):
    self.log: IO[bytes] = tempfile.TemporaryFile()  # its stderr: read back only if it fails to start
    package_root = str(Path(__file__).resolve().parents[1])  # jaxtune importable there as it is here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "jaxtune.coordinator", bind_address, str(processes), str(heartbeat_s),
         str(shutdown_s), str(grace_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True)  # no ^C
    assert self.proc.stdout is not None and self.proc.stdin is not None
    line = self.proc.stdout.readline().decode().strip()
    if line != READY:
      self.proc.wait()
      self.log.seek(0)
      lines = [s for s in self.log.read().decode(errors="replace").splitlines() if s.strip()]
      own = [s for s in lines if not re.match(r"[IWEF]\d{4} ", s)]  # its error, else the C++ log's last line
      said = own or [re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ", "", s) for s in lines]
      raise UserError(f"the coordination service for {processes} processes could not start on {bind_address} "
                      f"({said[-1] if said else f'exit code {self.proc.returncode}'}); check JAXTUNE_COORDINATOR: "
                      "this host's address, and a port free on it.")
    self.stdin = self.proc.stdin

  def done(self) -> None:
    """Every process has left the service: it stops as soon as process 0 exits."""
    try:
      self.stdin.write(DONE.encode())
      self.stdin.flush()
    except (OSError, ValueError):  # it is gone already, or this was said before (the pipe closed)
      pass


def main(argv: list[str]) -> int:
  from jax._src.lib import _jax

  bind_address, processes, heartbeat_s, shutdown_s, grace_s = argv[0], *map(int, argv[1:5])
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  service = _jax.get_distributed_runtime_service(bind_address, processes, heartbeat_timeout=heartbeat_s,
                                                 shutdown_timeout=shutdown_s)
  print(READY, flush=True)
  said = sys.stdin.buffer.read().decode(errors="replace")  # until process 0 exits
  if said != DONE:
    time.sleep(grace_s)  # process 0 died: the others read the verdict here and leave
  os._exit(0 if service else 1)  # not service.shutdown(): it would wait for clients that are gone


if __name__ == "__main__":
  main(sys.argv[1:])
