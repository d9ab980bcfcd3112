"""A run directory: its single-writer lock and the checks before a run's first write.

A new run never lands in a directory that holds one; a resume only continues the same run (the
config keys that decide data order, schedule and model unchanged; docs/failures.md).
The first write (config.yaml, the tokenizer) happens once every check has passed. A run directory is a
local path or an s3:// / gs:// URL (storage.py), the same code for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import jax
import yaml
from etils import epath
from jax.experimental import multihost_utils

from jaxtune import cli, storage, tasks
from jaxtune import config as config_lib
from jaxtune.config import Config
from jaxtune.errors import UserError
from jaxtune.train.checkpoints import Checkpoints

LOCK = ".lock"


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
  a lock held from another host cannot be checked, so it is refused with its owner named. On object
  storage, which has no exclusive create, the lock is written when absent and read back: of two runs
  starting in the same instant, the one whose write is not the last sees the other's and is refused.
  """

  def __init__(self, run_dir: epath.Path):
    self.path = run_dir / LOCK
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
    self.held = False

  def acquire(self) -> None:
    for _ in range(3):
      try:
        self._create()
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
      self.held = True
      return
    raise UserError(f"run dir {self.path.parent}: could not take the lock {self.path}; delete it if no run is using "
                    "that directory.")

  def _create(self) -> None:
    """Creates the lock holding `owner`; FileExistsError if another writer holds it."""
    if storage.is_remote(self.path):
      if self.path.exists():
        raise FileExistsError(self.path)
      self.path.write_text(json.dumps(self.owner))
      if self._holder() != self.owner:
        raise FileExistsError(self.path)
      return
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
      json.dump(self.owner, f)

  def _holder(self) -> dict[str, Any] | None:
    try:
      holder = json.loads(self.path.read_text())
      return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None
    except (OSError, ValueError):
      return None

  def release(self) -> None:
    """Removes the lock. Where it cannot be (a store that cannot be reached, a file system turned read-only) it
    stays, and the next run here takes it over as stale: the error that ended the run is the one reported."""
    if self.held:
      with contextlib.suppress(OSError, *(storage.store_errors() if storage.is_remote(self.path) else ())):
        self.path.unlink(missing_ok=True)
      self.held = False


# train keys a resume may change: they alter neither the data order nor the schedule (nor the result)
RESUMABLE_TRAIN_KEYS = ("eval_batch_size", "eval_every", "log_every", "compile_cache", "nonfinite",
                        "nonfinite_max_skips", "tensorboard", "wandb_project", "early_stopping_patience",
                        "early_stopping_threshold")
EXTENDABLE_TRAIN_KEYS = ("epochs", "max_steps")  # with --extend


def check_run_dir(cfg: Config, run_dir: epath.Path, resume: bool, extend: bool) -> None:
  """Refuses to mix a new run into an old one's directory, or to resume into a different run."""
  config_path = run_dir / "config.yaml"
  if config_path.exists() and not resume:
    raise UserError(f"run dir {run_dir} already holds a run; pass --resume to continue it or choose a "
                    "new --run-dir (nothing there was changed).")
  if resume:
    if not config_path.is_file():
      raise UserError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start one there.")
    if not (run_dir / "checkpoints").is_dir() or not Checkpoints(run_dir, read_only=True).steps():
      raise UserError(f"--resume: {run_dir} holds no finished checkpoint to resume from (the run stopped before "
                      "its first save); delete the directory or choose a new --run-dir, and start without --resume.")
    refused = resume_differences(config_lib.load(config_path), cfg, extend)
    if refused:
      raise UserError(f"--resume: the config differs from {config_path} in what decides the data order, schedule "
                      f"or model: {'; '.join(refused)}. Resume with the saved values, pass --extend to train a "
                      "finished run for more epochs / steps, or start a new --run-dir.")
  barrier("run dir checked")  # every process has looked before process 0 writes anything


def resume_differences(saved: Config, new: Config, extend: bool) -> list[str]:
  """`key: saved -> new` for each config change a resume must refuse (docs/failures.md)."""
  allowed = {f"train.{k}" for k in RESUMABLE_TRAIN_KEYS + (EXTENDABLE_TRAIN_KEYS if extend else ())}
  a, b = _flat(config_lib.to_dict(saved)), _flat(config_lib.to_dict(new))
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed  # where the data cache is changes no row
          if k not in allowed and not k.startswith(("mesh.", "checkpoint.")) and k not in ("model.remat",
                                                                                           "data.cache_dir")]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v and not k == "rules":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resumable(meta: dict[str, Any], step: int, train_feed: Any, steps: int) -> None:
  """The feed takes the restored step's saved data position (a split checks it); steps must remain."""
  train_feed.resume(meta.get("data_position"), step)
  if step >= steps:
    raise UserError(f"--resume: the run already reached its last step ({step} of {steps}); pass --extend with a "
                    "larger train.max_steps or train.epochs to train it further.")


def start_run(cfg: Config, run_dir: epath.Path, tokenizer: Any, lock: RunLock, created: bool) -> Checkpoints:
  """Takes the lock, writes config.yaml and the tokenizer (each atomically) into run_dir; opens its checkpoints."""
  if jax.process_index() == 0:
    try:
      if not storage.is_remote(run_dir):  # a store has no directories (and s3fs would create a missing bucket)
        run_dir.mkdir(parents=True, exist_ok=True)
      if not lock.held:
        lock.acquire()
        if (run_dir / "config.yaml").exists():  # another process started a run here since check_run_dir
          raise UserError(f"run dir {run_dir} already holds a run (started while this one was setting up); "
                          "choose a new --run-dir.")
      write_config(cfg, run_dir)
      if not storage.has_dir(run_dir / "tokenizer"):
        storage.write_dir(run_dir / "tokenizer", tokenizer.save_pretrained)
    except BaseException:
      lock.release()
      if created:
        with contextlib.suppress(OSError):
          run_dir.rmtree()
      raise
  barrier("run dir written")
  cli.log_details_to(run_dir, jax.process_index())  # from now on third-party log records go to RUN_DIR
  return Checkpoints(run_dir, tasks.checkpoint_config(cfg))


def write_config(cfg: Config, run_dir: epath.Path) -> None:
  if jax.process_index() == 0:
    storage.write_text(run_dir / "config.yaml", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxtune: {name}")
