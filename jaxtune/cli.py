"""Shared entry-point plumbing: process set-up for speed, and user errors as one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# glibc's malloc on transparent huge pages. XLA:CPU takes each step's temporaries (GBs) as one fresh
# mmap; on 4 KiB pages the kernel faults them in page by page, 512x as many faults as on 2 MiB pages.
# glibc reads tunables only at process start.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
# XLA:CPU's default scheduler orders independent ops for concurrency and so keeps many layers'
# activations alive at once; the memory-minimising order cut the MiniLM 32 x 256 train step's
# temporaries from 3.6 to 2.7 GB at the same speed (docs/performance-history.md). XLA:CPU reads it only
# from XLA_FLAGS, not per compile, and only before its backend starts.
MEMORY_FIRST_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
NO_TUNING = "JAXTUNE_NO_HOST_TUNING"  # set to 1 to run with the environment exactly as given
# libtpu, loaded on a host without TPUs to compile for a topology description (scripts/plan.py, the TPU compile
# tests), asks the cloud metadata server what it runs on and logs errors when nobody answers; naming a slice
# here answers it. ALLOW_MULTIPLE_LIBTPU_LOAD lets two processes (pytest-xdist workers) load libtpu at once,
# which it otherwise refuses with a lock file. These apply before jax is imported; values already set are kept.
COMPILE_ONLY_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                        "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_tpu(host_cpu: bool = True) -> None:
  """Sets COMPILE_ONLY_TPU_ENV (and, with `host_cpu`, JAX_PLATFORMS=cpu: the host runs nothing on its own
  accelerators) where not already set. Call before the first `import jax`."""
  for key, value in {**COMPILE_ONLY_TPU_ENV, **({"JAX_PLATFORMS": "cpu"} if host_cpu else {})}.items():
    os.environ.setdefault(key, value)


def tune_host() -> None:
  """Adds MEMORY_FIRST_SCHEDULE to XLA_FLAGS, then re-executes this process once with HUGE_PAGES added to
  GLIBC_TUNABLES (Linux glibc only; a no-op after). Settings the user gave are kept as they are."""
  if os.environ.get(NO_TUNING) == "1":
    return
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if MEMORY_FIRST_SCHEDULE.split("=")[0] not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {MEMORY_FIRST_SCHEDULE}".strip()
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "glibc.malloc.hugetlb" in tunables:
    return
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def command(name: str) -> list[str]:
  """The argv that runs `jaxtune NAME` in a fresh process of this Python (a checkout or an installed package)."""
  return [sys.executable, "-m", "jaxtune", name]


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the scripts' contract: a bad command line is one `error:` line (and the fix), exit 2."""

  def error(self, message: str) -> typing.NoReturn:
    sys.stderr.write(f"error: {self.prog}: {message}; see {self.prog} --help.\n")
    sys.exit(2)


def _number(kind: type, lo: float, lo_open: bool, what: str) -> Callable[[str], Any]:
  def parse(text: str) -> Any:
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or (value <= lo if lo_open else value < lo):
      raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value
  parse.__name__ = what  # argparse names the type in its messages
  return parse


positive_int = _number(int, 1, False, "a positive integer")  # a count where zero or fewer means nothing
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0, True, "a number > 0")


class Details:
  """Where third-party log records, Python warnings and background threads' tracebacks go instead of the terminal:
  RUN_DIR/details.log once a script names its run dir (`log_details_to`), before that a buffer, and at exit a temp
  file if no run dir took them. Every error line that follows such records names the file.

  A write that fails (the disk that filled up, a read-only file system) keeps the records for one more try at exit,
  after the failure's clean-up may have freed space; the handler never prints logging's own error report.
  """

  NAME = "details.log"

  def __init__(self) -> None:
    self.path: Path | None = None
    self.pending: list[str] = []
    self.written = False
    self.serious = False  # an error record or a traceback came: error lines name the file

  def add(self, text: str, serious: bool = True) -> None:
    self.pending.append(text.rstrip("\n") + "\n")
    self.serious = self.serious or serious
    self.flush()

  def flush(self) -> None:
    if self.path is None or not self.pending:
      return
    try:
      with open(self.path, "a") as f:
        start = f.tell()
        try:
          f.writelines(self.pending)
          f.flush()
        except OSError:
          f.truncate(start)  # no half record: the whole batch goes again at the next try
          raise
      self.pending, self.written = [], True
    except OSError:
      pass

  def attach(self, directory: str | Path, process: int = 0) -> None:
    """Sends the records to `directory`/details.log (process k > 0: details.k.log) from now on."""
    self.path = Path(directory) / (self.NAME if not process else f"details.{process}.log")
    self.flush()

  def where(self) -> Path | None:
    """The file holding the records, writing them to a temp file first if no run dir took them; None if none."""
    self.flush()
    if self.pending:  # no run dir took them, or it cannot be written
      self.path = Path(tempfile.gettempdir()) / f"jaxtune-{os.getpid()}-{self.NAME}"
      self.flush()
    return self.path if self.written else None

  def suffix(self) -> str:
    """' (details: FILE)' once errors or tracebacks were recorded (not for warnings alone), else ''."""
    where = self.where()
    return f" (details: {where})" if where and self.serious else ""

  @contextlib.contextmanager
  def capturing(self) -> Iterator[None]:
    """Routes Python logging (WARNING and up), warnings, unraisable and thread exceptions here while active."""
    root, handler = logging.getLogger(), _Handler(self)
    saved = root.handlers[:], root.level, threading.excepthook, sys.unraisablehook
    root.handlers, root.level = [handler], min(root.level, logging.WARNING)
    logging.captureWarnings(True)
    threading.excepthook = lambda a: self.add(_format(a.exc_type, a.exc_value, a.exc_traceback,
                                                      f"in thread {a.thread.name if a.thread else '?'}"))
    sys.unraisablehook = lambda u: self.add(_format(u.exc_type, u.exc_value, u.exc_traceback, str(u.err_msg or "")))
    try:
      yield
    finally:
      logging.captureWarnings(False)
      (root.handlers, root.level, threading.excepthook, sys.unraisablehook) = saved


class _Handler(logging.Handler):
  def __init__(self, details: Details):
    super().__init__(logging.WARNING)
    self.details = details
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self.details.add(self.format(record), serious=record.levelno >= logging.ERROR)
    except Exception:  # a record that cannot be formatted must not print logging's report on the terminal
      pass


def _format(kind: Any, value: BaseException | None, tb: Any, context: str) -> str:
  return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {context}\n" + "".join(traceback.format_exception(kind, value, tb))


DETAILS = Details()


def log_details_to(directory: Any, process: int = 0) -> None:
  """Called once a script's run dir exists: third-party details go to its details.log (a local one; a store's
  run keeps them in the temp file)."""
  from jaxtune import storage

  if not storage.is_remote(directory) and Path(directory).is_dir():
    DETAILS.attach(directory, process)


def run(main: Callable[[], int | None]) -> None:
  """Runs `main` after `tune_host`; ends every failure with one line and its exit code.

  UserError: `error: <message>`, exit 2. errors.Stopped (preemption, non-finite loss, a failed checkpoint
  write): its line and code. A file-system error (read-only or full disk, missing permission): one line naming
  the path, exit 2. Ctrl-C outside the training loop: exit 130. Anything else is a bug or a failure nobody
  foresaw: one line naming it and the file with its traceback, exit 1. Third-party log records and tracebacks
  go to that file (`Details`), not to the terminal.
  """
  tune_host()
  from jaxtune import errors

  global DETAILS
  DETAILS = Details()
  with DETAILS.capturing():
    try:
      code = main()
    except errors.UserError as e:
      _fail(f"error: {e}{DETAILS.suffix()}", errors.EXIT_USER_ERROR)
    except errors.Stopped as e:  # an error names the details; a preemption's "stopped at step N" line stays as is
      _fail(f"{e}{DETAILS.suffix() if str(e).startswith('error:') else ''}", e.code, e.abandon)
    except KeyboardInterrupt:
      _fail("interrupted; nothing more was saved (checkpoints already written are intact)", errors.EXIT_INTERRUPTED)
    except OSError as e:
      where = f" {e.filename}" if e.filename else ""
      _fail(f"error: cannot read or write{where}: {e.strerror or e}; check that the path exists, is writable and "
            f"that its disk has space{DETAILS.suffix()}.", errors.EXIT_USER_ERROR)
    except Exception as e:
      from jaxtune import distributed

      distributed.await_verdict_if_lost_peer(e)  # a collective failed as a peer died: the watch's line ends it
      DETAILS.add(_format(type(e), e, e.__traceback__, "the unexpected failure"))
      first = str(e).splitlines()[0][:300] if str(e) else ""
      _fail(f"error: an unexpected failure, {type(e).__name__}: {first}; the traceback is in {DETAILS.where()}: "
            "please report it with that file.", errors.EXIT_INTERNAL)
  sys.exit(code or 0)


def _fail(line: str, code: int, abandon: bool = False) -> None:
  """Prints `line` and exits with `code`; with `abandon` (a write that failed, whose background threads would
  wait out their timeouts and then print at interpreter exit) at once, after writing out the details."""
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  if abandon:
    DETAILS.flush()
    os._exit(code)  # not waiting for background writes that cannot finish
  sys.exit(code)
