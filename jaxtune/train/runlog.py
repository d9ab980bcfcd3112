"""The run log: RUN_DIR/metrics.jsonl, the progress bar, TensorBoard and W&B; reading the log back.

On object storage, which cannot append, metrics.jsonl is rewritten whole from the records held in memory:
at most every FLUSH_S seconds, and always at an evaluation, before a checkpoint save and at the end. A kill
loses only records after the last checkpoint, which the resumed run writes again; no record is doubled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import jax
from etils import epath
from tqdm import tqdm

from jaxtune import storage
from jaxtune.errors import UserError

FLUSH_S = 30.0  # object storage: the longest metrics.jsonl goes unwritten while records wait


def _append(path: Path, text: str) -> None:
  """Appends `text` whole or not at all: a write cut short (a full disk) is truncated away before its error."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    start, data = os.fstat(fd).st_size, text.encode()
    try:
      if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError as e:
      os.ftruncate(fd, start)
      raise OSError(e.errno, e.strerror, str(path)) from None
  finally:
    os.close(fd)


def json_safe(value: Any) -> Any:
  """`value` with NaN and infinities replaced by null, which JSON (unlike Python's json) allows."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value


class RunLog:
  """Appends records to run_dir/metrics.jsonl, TensorBoard (and W&B when asked) and drives a progress bar;
  silent off process 0.

  Started at step S > 0 (a resume), it first drops the records of steps after S, which the
  resumed run writes again, so the file holds each step once (TensorBoard is told to purge them too).
  """

  def __init__(self, run_dir: epath.Path, total_steps: int, start_step: int, tensorboard: bool = False,
               wandb: Any = None, quiet: bool = False):
    self.active = jax.process_index() == 0
    self.path = run_dir / "metrics.jsonl"
    self.remote = storage.is_remote(run_dir)
    self.lines: list[str] = []  # on object storage: the whole file, rewritten by flush
    self.flushed = time.monotonic()
    if self.active and self.path.exists():
      lines = self.path.read_text().splitlines()
      kept = [line for line in lines if _step_of(line) <= start_step]
      if self.remote:
        self.lines = kept
      if len(kept) < len(lines):
        storage.write_text(self.path, "".join(line + "\n" for line in kept))
    self.quiet = quiet
    self.run_dir = run_dir
    self.tb_dir = None  # TensorBoard writes locally; on object storage its files are uploaded at each flush
    self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.active or quiet, dynamic_ncols=True)
    self.latest_eval: dict[str, str] = {}
    self.tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter

      if self.remote:
        self.tb_dir = tempfile.TemporaryDirectory(prefix="jaxtune-tb-")
      self.tb = SummaryWriter(self.tb_dir.name if self.tb_dir else str(run_dir),
                              purge_step=start_step + 1 if start_step else None)
    self.wandb = wandb if self.active else None

  def write(self, record: dict[str, Any]) -> None:
    if not self.active:
      return
    line = json.dumps(json_safe(record), allow_nan=False)
    if not self.remote:
      _append(self.path, line + "\n")
      return
    self.lines.append(line)
    if time.monotonic() - self.flushed >= FLUSH_S:
      self.flush()

  def flush(self) -> None:
    """Object storage: writes metrics.jsonl (and TensorBoard's files) whole; locally each write already landed."""
    if not (self.active and self.remote):
      return
    with storage.writing(self.run_dir, kept="the log up to the last checkpoint"):
      storage.write_text(self.path, "".join(line + "\n" for line in self.lines))
      if self.tb is not None:
        self.tb.flush()
        storage.upload_dir(Path(self.tb_dir.name), self.run_dir)
    self.flushed = time.monotonic()

  def train(self, step: int, record: dict[str, float]) -> None:
    self.write({"step": step, **record})
    self._scalars("train", step, record)
    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **self.latest_eval)

  def eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
    self.write({"step": step, "split": split, **metrics})
    self._scalars(split, step, metrics)
    if self.active:
      shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                        if k != "samples")
      line = f"step {step} {split}: {shown}"
      if self.quiet:
        print(line, flush=True)
      else:
        self.bar.write(line)
      first = next((k for k, v in metrics.items() if isinstance(v, float)), None)
      self.latest_eval = {f"{split[:3]}_{first}": f"{metrics[first]:.4f}"} if first else {}
      if self.tb is not None:
        self.tb.flush()
      self.flush()

  def _scalars(self, prefix: str, step: int, values: dict[str, Any]) -> None:
    """Numeric, finite values as TensorBoard scalars (prefix/name) and to W&B."""
    scalars = {f"{prefix}/{k}": float(v) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if self.tb is not None:
      for key, value in scalars.items():
        self.tb.add_scalar(key, value, step)
    if self.wandb is not None and scalars:
      self.wandb.log(scalars, step=step)

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def close(self, failed: bool = False) -> None:
    """Ends the log; after a failure (`failed`) a last write that fails too does not hide the first error."""
    self.bar.close()
    with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
      self.flush()
    if self.tb is not None:
      self.tb.close()
      if self.tb_dir is not None:
        storage.upload_dir(Path(self.tb_dir.name), self.run_dir)
        self.tb_dir.cleanup()
    if self.wandb is not None:
      self.wandb.finish()


def start_wandb(project: str, run_dir: epath.Path, config: dict[str, Any]) -> Any:
  """A W&B run (process 0) logging to `project`, resumed across --resume by an id kept in the run dir."""
  if not project or jax.process_index() != 0:
    return None
  try:
    import wandb
  except ImportError:
    raise UserError(f"train.wandb_project={project!r} needs Weights & Biases: pip install wandb (or set "
                    "train.wandb_project to an empty string).") from None
  id_file = run_dir / "wandb_id.txt"
  run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
  storage.write_text(id_file, run_id + "\n")
  local = tempfile.mkdtemp(prefix="jaxtune-wandb-") if storage.is_remote(run_dir) else str(run_dir)  # W&B's own files
  return wandb.init(project=project, dir=local, id=run_id, resume="allow", name=run_dir.name, config=config)


def read_records(run_dir: str | Path | epath.Path) -> list[dict[str, Any]]:
  """Every record of RUN_DIR/metrics.jsonl in order ([] without one); a line cut short by a kill is skipped
  (the resumed run rewrites it)."""
  path = storage.path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def _step_of(line: str) -> float:
  """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf
