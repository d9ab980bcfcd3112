"""Multi-host start-up: jax.distributed from JAXTUNE_* env vars, or JAX's own detection of the cluster; and the
watch that ends the other processes with one line when one of them dies (`PeerWatch`)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxtune import errors
from jaxtune.coordinator import Coordinator
from jaxtune.errors import EXIT_PREEMPTED, UserError

PEER_TIMEOUT_VAR = "JAXTUNE_PEER_TIMEOUT_S"
PEER_TIMEOUT_S = 60  # default: a process silent this long is taken for dead and the others stop
JAX_HEARTBEAT_S = 100  # jax.distributed's own heartbeat timeout: past it JAX aborts every process (SIGABRT)
INIT_TIMEOUT_S = 300  # jax.distributed's: how long a process waits for all the others to connect
SHUTDOWN_TIMEOUT_S = 300  # jax.distributed's: how long JAX's shutdown barrier at exit waits for every process
COORDINATOR: Coordinator | None = None  # process 0's handle on the coordination service's process


def initialize() -> None:
  """Joins the process group when launched as one of several processes; a no-op otherwise.

  JAXTUNE_COORDINATOR=host:port with JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID: any cluster.
  An srun step of several tasks: JAX finds the coordinator (the step's first node, a port from the job id)
  and the process id; the process count is the step's, and each task drives the GPUs `_slurm_local_device_ids`
  gives it. JAXTUNE_DISTRIBUTED=auto, SLURM_NTASKS > 1 outside a step, or a TPU VM slice of several
  workers: JAX finds the coordinator, process count and process id itself. With several processes a
  `PeerWatch` then ends them all, one line each, when one dies (JAXTUNE_PEER_TIMEOUT_S).
  """
  coordinator = os.environ.get("JAXTUNE_COORDINATOR")
  mode = os.environ.get("JAXTUNE_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise UserError(f"JAXTUNE_DISTRIBUTED={mode!r}; set it to 'auto' (let JAX detect the cluster) or unset it.")
  step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")  # srun sets it in every task it starts
  if coordinator:
    try:
      num_processes, process_id = int(os.environ["JAXTUNE_NUM_PROCESSES"]), int(os.environ["JAXTUNE_PROCESS_ID"])
    except (KeyError, ValueError):
      raise UserError("JAXTUNE_COORDINATOR is set, so JAXTUNE_NUM_PROCESSES and JAXTUNE_PROCESS_ID must be set "
                      "to integers too (the process count, and this process's id from 0).") from None
    if not 0 <= process_id < num_processes:
      raise UserError(f"JAXTUNE_PROCESS_ID={process_id} is not in [0, JAXTUNE_NUM_PROCESSES={num_processes}).")
    _join(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif step_tasks.isdigit():
    # The step's task count, not SLURM_NTASKS: `srun --preserve-env` passes the job's on.
    if int(step_tasks) > 1 or mode == "auto":
      _join(num_processes=int(step_tasks), local_device_ids=_slurm_local_device_ids())
  elif mode == "auto" or _detected_multi_process():
    try:
      _join()
    except ValueError as e:  # JAX found no cluster to read the coordinator, process count or id from
      raise UserError(f"several processes were expected but jax.distributed found no cluster to join ({e}). "
                      "Under SLURM start one process per task with srun (a batch script's own shell is not a step "
                      "of several tasks); elsewhere set JAXTUNE_COORDINATOR, JAXTUNE_NUM_PROCESSES and "
                      "JAXTUNE_PROCESS_ID.") from None


def peer_timeout() -> int:
  """Seconds without a heartbeat after which a process counts as dead: JAXTUNE_PEER_TIMEOUT_S, default 60."""
  text = os.environ.get(PEER_TIMEOUT_VAR, "").strip()
  if not text:
    return PEER_TIMEOUT_S
  if not text.isdigit() or int(text) < 1:
    raise UserError(f"{PEER_TIMEOUT_VAR}={text!r}; set it to a whole number of seconds, at least 1 (default "
                    f"{PEER_TIMEOUT_S}): how long the processes wait for a silent one before stopping.")
  return int(text)


def _join(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
          local_device_ids: list[int] | None = None) -> None:
  """What jax.distributed.initialize does, with JAX's coordination service in a process of its own
  (jaxtune/coordinator.py) instead of inside process 0, so that process 0's death does not abort the others; then
  the peer watch. JAX's own heartbeat timeout stays at its default unless the peer timeout needs it longer: the
  watch must end the processes before JAX aborts them. JAX's preemption service is not started: its C++ SIGTERM
  handler swallowed a SIGTERM that came before the training loop (which decides stops itself, train/loop.py)."""
  from jax._src import clusters
  from jax._src import distributed as jax_distributed  # where JAX keeps its coordination-service client
  from jax._src.lib import _jax

  timeout = peer_timeout()
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  heartbeat = jax_heartbeat(timeout)
  if local_device_ids is None and (ids := os.environ.get("JAX_LOCAL_DEVICE_IDS")):
    local_device_ids = [int(i) for i in ids.split(",")]
  if None in (coordinator_address, num_processes, process_id, local_device_ids):
    coordinator_address, num_processes, process_id, local_device_ids = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(
            coordinator_address, num_processes, process_id, local_device_ids, None, INIT_TIMEOUT_S))
  if coordinator_address is None or num_processes is None or process_id is None:
    raise ValueError("coordinator_address, num_processes and process_id must all be known")
  if local_device_ids:
    visible = ",".join(str(i) for i in local_device_ids)
    jax.config.update("jax_cuda_visible_devices", visible)
    jax.config.update("jax_rocm_visible_devices", visible)
  state = jax_distributed.global_state
  if process_id == 0:
    global COORDINATOR
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "[::]:" + coordinator_address.rsplit(":", 1)[1])
    COORDINATOR = Coordinator(bind, num_processes, heartbeat, SHUTDOWN_TIMEOUT_S,
                              grace_s=timeout + PeerWatch.slack(timeout))
  state.coordinator_address, state.num_processes, state.process_id = coordinator_address, num_processes, process_id
  if (partition := os.environ.get("JAX_PARTITION_INDEX")) is not None:
    state.partition_index = int(partition)
  state.client = _jax.get_distributed_runtime_client(coordinator_address, process_id, init_timeout=INIT_TIMEOUT_S,
                                                     use_compression=True, heartbeat_timeout=heartbeat)
  state.client.connect()
  if COORDINATOR is not None:
    atexit.register(_leave_coordinator)  # after the watch's own atexit hook (registered below: they run LIFO)
  if num_processes > 1:
    global WATCH
    WATCH = PeerWatch(state.client, process_id, num_processes, timeout)
    WATCH.start()


def jax_heartbeat(timeout: int) -> int:
  """JAX's heartbeat timeout for a peer timeout of `timeout` s: its default, or longer so that the watch ends the
  processes first (past it the service aborts every process)."""
  return max(JAX_HEARTBEAT_S, timeout + PeerWatch.slack(timeout))


def _leave_coordinator() -> None:
  """Process 0 at exit: JAX's shutdown barrier (which JAX's own atexit hook would run next), then the service may
  stop as soon as this process is gone."""
  jax.distributed.shutdown()
  if COORDINATOR is not None:
    COORDINATOR.done()


class PeerWatch:
  """Ends this process with one line and exit 75 when another process of the job died or left training alone.

  Every process's daemon thread writes a heartbeat (its state and a counter) into JAX's coordination service
  every `interval` seconds and reads everyone's. A process whose heartbeat has not changed for `timeout` seconds
  is taken for dead: the first to see it publishes the verdict, and every process prints `error: process P of N
  stopped responding (no heartbeat for T s); the last checkpoint is step K; rerun with --resume` and leaves at
  once (os._exit: a collective with a dead peer never returns, and JAX's shutdown barrier would wait for it).
  Process 0 leaves last: it hosts the coordination service the others read the verdict from.

  A process whose training loop ended on an error of its own (not an agreed stop: SIGTERM's, a non-finite loss)
  is marked `failed`; it prints its own line and waits in JAX's shutdown barrier, and the others, stuck in a
  collective it will never join, print `process P of N left the run` and meet it there. A collective that fails
  because a peer went away (gloo: the connection closed) raises in the training loop; `watching` holds that
  error until the verdict instead of letting it reach the terminal. The thread is plain Python: a process whose
  interpreter is blocked for longer than `timeout` (the GIL held by one C call) looks dead to the others.

  Process 0 is watched like the others: JAX's coordination service runs in a process of its own
  (jaxtune/coordinator.py), which outlives it. Not covered: process 0's host going down with that process (JAX's
  client in every other process then aborts: SIGABRT, its own message and a C++ stack trace).
  """

  PREFIX = "jaxtune/peers/"

  def __init__(self, client: Any, me: int, count: int, timeout: int):
    self.client, self.me, self.count, self.timeout = client, me, count, timeout
    self.interval = max(0.2, min(5.0, timeout / 5))
    self.checkpoints: Any = None  # the run's checkpoints dir while training (named in the line)
    self.release: Callable[[], None] | None = None  # the run dir's lock, released before leaving
    self.suspect = threading.Event()  # the main thread saw a collective fail
    self.state = "run"  # "failed": training ended here on an error of this process alone; "exit": atexit ran
    self.lock = threading.Lock()
    self.ended = False

  @staticmethod
  def slack(timeout: int) -> int:
    """Seconds past `timeout` by which every process has left: two heartbeat reads, listing the checkpoints (at
    most 10 s) and process 0 waiting for the others (at most 5 s)."""
    return int(2 * min(5.0, timeout / 5)) + 20

  def start(self) -> None:
    atexit.register(self._leaving)  # runs before JAX's own atexit shutdown (registered at import, so later)
    threading.Thread(target=self._run, name="jaxtune-peer-watch", daemon=True).start()

  def _leaving(self) -> None:
    if self.state == "run":  # a failed process stays failed for the others to see
      self.mark("exit")

  def mark(self, state: str) -> None:
    """Publishes this process's state now (the heartbeat carries it from then on)."""
    self.state = state
    with contextlib.suppress(Exception):
      self.client.key_value_set(f"{self.PREFIX}alive/{self.me}", f"{state}:-1", allow_overwrite=True)

  def _run(self) -> None:
    from jax._src import distributed as jax_distributed

    start = time.monotonic()
    last_ok = start
    seen = {p: (None, start) for p in range(self.count) if p != self.me}  # value, when it last changed
    failed: dict[int, float] = {}  # peer -> when it was first seen failed
    beat = 0
    while jax_distributed.global_state.client is self.client:  # None once JAX shut down at exit
      now = time.monotonic()
      beat += 1
      try:
        self.client.key_value_set(f"{self.PREFIX}alive/{self.me}", f"{self.state}:{beat}", allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(self.PREFIX))
        last_ok = now
      except Exception:  # the coordination service (process 0) is gone, or JAX is shutting it down at exit
        if self.state == "run" and now - last_ok > self.timeout:
          self._end(0)
        time.sleep(self.interval)
        continue
      if (published := values.get(f"{self.PREFIX}verdict")) is not None and self.state == "run":
        self._end(None, published=published)
      for p, (value, since) in seen.items():
        current = values.get(f"{self.PREFIX}alive/{p}")
        if current is not None and current.startswith("failed:") and self.state == "run":
          # It waits in JAX's shutdown barrier, and this process in a collective it will never join: now if one
          # failed here already, else after two reads (the same error may be reaching this process too)
          if self.suspect.is_set() or now - failed.setdefault(p, now) >= 2 * self.interval:
            self._end(p, exited=True)
        if current != value:
          seen[p] = (current, now)
        elif now - since > self.timeout:  # also at exit: JAX's shutdown barrier would wait for a dead peer
          self._end(p)
      time.sleep(self.interval)

  def _end(self, peer: int | None, exited: bool = False, published: str | None = None) -> None:
    """Publishes the verdict (unless another process did: the first stands), prints it and leaves with exit 75.

    A dead peer: at once (process 0 after the others, which read the verdict from its coordination service). A
    peer that exited on its own waits in JAX's shutdown barrier: this process meets it there first, so that it
    leaves with its own exit code instead of being aborted when the coordination service goes."""
    with self.lock:
      if self.ended:
        return
      self.ended = True
    if published is None:
      with contextlib.suppress(Exception):
        self.client.key_value_set(f"{self.PREFIX}verdict", json.dumps([exited, self._line(peer, exited)]))
      published = _bounded(lambda: self.client.key_value_try_get(f"{self.PREFIX}verdict"), 5)
    exited, line = json.loads(published) if published else (exited, self._line(peer, exited))
    if self.release is not None:
      _bounded(self.release, 5)
    with contextlib.suppress(Exception):
      sys.stdout.flush()
    os.write(2, (line + "\n").encode())
    if exited:
      _bounded(jax.distributed.shutdown, self.timeout)
    else:
      with contextlib.suppress(Exception):
        self.client.key_value_set(f"{self.PREFIX}left/{self.me}", "1")
      deadline = time.monotonic() + 5
      while self.me == 0 and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
          if len(self.client.key_value_dir_get(f"{self.PREFIX}left/")) >= self.count - 1:
            break
        time.sleep(0.05)
    if COORDINATOR is not None:
      COORDINATOR.done()
    os._exit(EXIT_PREEMPTED)

  def _line(self, peer: int | None, exited: bool) -> str:
    who = f"process {peer} of {self.count}" + (" (the coordinator)" if peer == 0 else "")
    what = (f"{who} left the run (its own output says why)" if exited
            else f"{who} stopped responding (no heartbeat for {self.timeout} s)")
    return f"error: {what}; {self._resume_advice()}"

  def _resume_advice(self) -> str:
    if self.checkpoints is None:
      return "rerun the command (with --resume if the run saved a checkpoint)"
    found = _bounded(lambda: committed_steps(self.checkpoints), 10)  # a store that no longer answers: no wait
    if found is None:
      return f"rerun with --resume (the checkpoints in {self.checkpoints} could not be listed)"
    if not found:
      return "no checkpoint was saved yet: start again without --resume in a new --run-dir (or after deleting this one)"
    return f"the last checkpoint is step {found[-1]}; rerun with --resume"

  def await_verdict(self) -> None:
    """Called by the main thread after a collective failed: the verdict (which ends the process) comes within the
    timeout if a peer died; returns if none came."""
    self.suspect.set()
    time.sleep(self.timeout + self.slack(self.timeout))


WATCH: PeerWatch | None = None

PEER_FAILURE = ("gloo", "connection closed", "connection reset", "broken pipe", "socket closed", "unavailable",
                "deadline_exceeded", "barrier", "heartbeat", "nccl")


def _bounded(fn: Callable[[], Any], seconds: float) -> Any:
  """fn() in a daemon thread, or None if it fails or has not returned after `seconds`."""
  out: list[Any] = []

  def call() -> None:
    with contextlib.suppress(Exception):
      out.append(fn())

  thread = threading.Thread(target=call, daemon=True)
  thread.start()
  thread.join(seconds)
  return out[0] if out else None


def committed_steps(checkpoints: Any) -> list[int]:
  """The steps in a checkpoints/ dir that a resume can read: renamed into place (local disk) or with Orbax's
  commit file (a store)."""
  from jaxtune import storage

  if not checkpoints.is_dir():
    return []
  remote = storage.is_remote(checkpoints)
  return sorted(int(p.name) for p in checkpoints.iterdir()
                if p.name.isdigit() and (not remote or (p / "commit_success.txt").exists()))


@contextlib.contextmanager
def watching(checkpoints: Any, release: Callable[[], None]) -> Iterator[None]:
  """Around the training loop of a multi-process run: the lost-peer line names the last checkpoint in
  `checkpoints`, `release` (the run dir's lock) is called before the process leaves, and an error that a peer's
  death causes (a failed collective or barrier) waits for the watch's verdict instead of reaching the terminal.
  A no-op in a single process."""
  watch = WATCH
  if watch is None:
    yield
    return
  watch.checkpoints, watch.release = checkpoints, release
  try:
    yield
  except errors.Stopped as e:
    if e.code not in (errors.EXIT_PREEMPTED, errors.EXIT_NONFINITE):  # those stops are agreed by every process
      watch.mark("failed")
    raise
  except BaseException as e:
    if isinstance(e, Exception) and _peer_failure(e):
      watch.await_verdict()
    watch.mark("failed")  # the others stop too instead of waiting for this process in their next collective
    raise


def await_verdict_if_lost_peer(e: BaseException) -> None:
  """For an error that ended a multi-process run outside the training loop (loading, the first compile, the
  final evaluation): if it reads like a collective that lost a peer, waits for the watch's verdict, which prints
  the one line and ends the process, instead of printing the error as well. Returns otherwise."""
  if WATCH is not None and _peer_failure(e):
    WATCH.await_verdict()


def _peer_failure(e: BaseException | None) -> bool:
  """Whether `e` (or an exception it was raised from) reads like a collective that lost a peer."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if any(word in str(e).lower() for word in PEER_FAILURE):
      return True
    e = e.__cause__ or e.__context__
  return False


def _detected_multi_process() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _slurm_local_device_ids() -> list[int] | None:
  """The GPUs an srun task drives, as jax.distributed.initialize's local_device_ids: [] for every GPU the task
  sees, None for JAX's default under SLURM (GPU number SLURM_LOCALID of those it sees: one task per GPU).

  The only task of the step on its node drives all its GPUs (JAX's default would leave it one). Several tasks on
  a node each drive their own: the ones SLURM bound to them (`--gpus-per-task`, `--gpu-bind`: the task sees
  fewer GPUs than SLURM_GPUS_ON_NODE), else one each by SLURM_LOCALID. JAX_LOCAL_DEVICE_IDS overrides this.
  """
  if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None  # JAX reads it
  if _slurm_tasks_on_node() == 1:
    return []
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ROCR_VISIBLE_DEVICES"))
  gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
  if visible is not None and gpus.isdigit() and len(visible.split(",")) < int(gpus):
    return []
  return None


def _slurm_tasks_on_node() -> int | None:
  """This node's task count in the srun step: SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on each of the first 3
  nodes, then 1) at SLURM_NODEID, the node's index in the step; None if either is missing or malformed."""
  counts = []
  for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
    if not (m := re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())):
      return None
    counts += [int(m[1])] * int(m[2] or 1)
  node = os.environ.get("SLURM_NODEID", "")
  return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None
