"""Shared entry-point plumbing: process set-up for speed, and user errors as one line on stderr with exit code 2."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

# glibc's malloc on transparent huge pages. XLA:CPU takes each step's temporaries (GBs) as one fresh
# mmap; on 4 KiB pages the kernel faults them in page by page, 512x as many faults as on 2 MiB pages.
# glibc reads tunables only at process start.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
# XLA:CPU's default scheduler orders independent ops for concurrency and so keeps many layers'
# activations alive at once; the memory-minimising order cut the MiniLM 32 x 256 train step's
# temporaries from 3.6 to 2.7 GB at the same speed (README, Performance). XLA:CPU reads it only
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


def run(main: Callable[[], int | None]) -> None:
  """Runs `main` after `tune_host`; ends every expected failure with one line and its exit code.

  UserError: `error: <message>`, exit 2. errors.Stopped (preemption, non-finite loss): its line and
  code. A file-system error (read-only or full disk, missing permission): one line naming the path,
  exit 2. Ctrl-C outside the training loop: exit 130.
  """
  tune_host()
  from jaxtune import errors

  try:
    code = main()
  except errors.UserError as e:
    _fail(f"error: {e}", errors.EXIT_USER_ERROR)
  except errors.Stopped as e:
    _fail(str(e), e.code, e.abandon)
  except KeyboardInterrupt:
    _fail("interrupted; nothing more was saved (checkpoints already written are intact)", errors.EXIT_INTERRUPTED)
  except OSError as e:
    where = f" {e.filename}" if e.filename else ""
    _fail(f"error: cannot read or write{where}: {e.strerror or e}; check that the path exists, is writable and "
          "that its disk has space.", errors.EXIT_USER_ERROR)
  sys.exit(code or 0)


def _fail(line: str, code: int, abandon: bool = False) -> None:
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  if abandon:
    os._exit(code)  # not waiting for background writes that cannot finish
  sys.exit(code)
