"""A run directory's single-writer lock, atomic file writes, and SIGTERM / SIGINT as a request to stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jaxtune.errors import UserError

LOCK = ".lock"


def write_text(path: Path, text: str) -> None:
  """Writes `path` whole or not at all: a temp file in the same directory, then a rename."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_text(text)
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def write_dir(path: Path, fill: Callable[[Path], Any]) -> None:
  """Creates directory `path` whole or not at all: `fill(tmp_dir)`, then a rename."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    fill(tmp)
    tmp.rename(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
  """Whether process `pid` on this host exists and is not a zombie."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  with contextlib.suppress(OSError):  # Linux: a killed child nobody has waited for yet is a zombie
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
  return True


class RunLock:
  """RUN_DIR/.lock, created exclusively, holding this process's host and pid; one writer per run dir.

  A lock whose process is gone (same host, pid not running) is stale and taken over with a warning;
  a lock held from another host cannot be checked, so it is refused with its owner named.
  """

  def __init__(self, run_dir: Path):
    self.path = run_dir / LOCK
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def acquire(self) -> None:
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and holder.get("host") == self.owner["host"] and not _alive(int(holder["pid"])):
          print(f"warning: removing the stale lock {self.path} of process {holder['pid']}, which is gone",
                file=sys.stderr)
          self.path.unlink(missing_ok=True)
          continue
        if holder is None:  # being written by its owner this instant, or unreadable: look again
          continue
        raise UserError(f"run dir {self.path.parent} is in use by process {holder['pid']} on {holder['host']} "
                        f"(lock {self.path}); wait for that run to end, or delete the lock if it is gone.") from None
      with os.fdopen(fd, "w") as f:
        json.dump(self.owner, f)
      self.held = True
      return
    raise UserError(f"run dir {self.path.parent}: could not take the lock {self.path}; delete it if no run is using "
                    "that directory.")

  def _holder(self) -> dict[str, Any] | None:
    try:
      holder = json.loads(self.path.read_text())
      return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None
    except (OSError, ValueError):
      return None

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False


class StopRequests:
  """SIGTERM and SIGINT, while active, ask training to stop after the current step instead of killing it.

  A second SIGINT (Ctrl-C) stops at once with KeyboardInterrupt. Outside the main thread (where
  Python cannot take signals) this does nothing.
  """

  def __init__(self) -> None:
    self.signal: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    print(f"\n{self.signal}: stopping after this step and saving a checkpoint (Ctrl-C again stops at once, "
          "without saving)", file=sys.stderr, flush=True)

  @contextlib.contextmanager
  def active(self) -> Iterator[StopRequests]:
    main = threading.current_thread() is threading.main_thread()
    if main:
      self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, handler in self._previous.items():
        signal.signal(s, handler)
      self._previous = {}
