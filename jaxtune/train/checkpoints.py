"""Orbax checkpoints of a run: params, optimiser state, train state and JSON metadata per step."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxtune import params as params_lib
from jaxtune import storage
from jaxtune.config import CheckpointConfig
from jaxtune.errors import EXIT_USER_ERROR, Stopped, UserError

ITEMS = ("params", "opt_state", "train", "meta")


class Checkpoints:
  """The checkpoints/ directory of a run: keeps the last K steps plus the best by a metric."""

  def __init__(self, run_dir: str | Path, cfg: CheckpointConfig = CheckpointConfig(), read_only: bool = False):
    self.dir = storage.path(run_dir) / "checkpoints"
    self.cfg = cfg
    if read_only and not self.dir.is_dir():
      raise UserError(f"{run_dir} has no checkpoints/ directory; give the run directory (--run-dir) of a "
                      "finetune.py run.")
    keep = [policies.LatestN(cfg.keep_last)]
    if cfg.best_metric:
      keep.append(policies.BestN(get_metric_fn=lambda m: m[cfg.best_metric], n=1,
                                 reverse=cfg.best_direction == "min", keep_checkpoints_without_metrics=False))
    # A write killed midway leaves only a temp dir (Orbax renames a step dir into place once complete),
    # which a writable manager deletes on opening and a read-only one never lists.
    options = ocp.CheckpointManagerOptions(preservation_policy=policies.AnyPreservationPolicy(keep),
                                           read_only=read_only, create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           **storage.checkpoint_options(self.dir))
    with storage.reaching(self.dir, "checkpoints"):
      self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)
    self.failed = False  # a write failed: the manager's queue may never drain, so nothing more waits on it

  def save(self, step: int, params: Any, opt_state: Any, train: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None) -> None:
    """Writes step atomically (Orbax renames a finished temp dir); returns once it is queued, or with
    checkpoint.async_save false once it has committed."""
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                              train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave({**meta, "metrics": metrics}))
    usable = {k: v for k, v in (metrics or {}).items() if k == self.cfg.best_metric}
    with self._writing():
      self.manager.save(step, args=args, metrics=usable or None, force=True)
      if not self.cfg.async_save:  # the same write, waited for: training resumes after the commit
        self.manager.wait_until_finished()

  def wait(self) -> None:
    if not self.failed:
      with self._writing():
        self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """On object storage a failed write stops the run with exit 75, keeping the committed checkpoints. Locally a
    full disk, a read-only file system or a refused permission stops it with one line and exit 2, after the
    partial step directory is removed."""
    try:
      with storage.writing(self.dir, any_error=True, kept="every checkpoint committed before it"):
        yield
    except Stopped:
      self.failed = True
      raise
    except Exception as e:
      found = storage.disk_error(e)
      if found is None:
        raise
      self.failed = True
      (reason, fix), (removed, left) = found, self._remove_partial()
      kept = self.steps()
      raise Stopped(f"error: writing a checkpoint to {self.dir} failed: {reason}; "
                    + (f"the partial {removed} was removed; " if removed else "")
                    + (f"the partial {left} could not be removed; " if left else "")
                    + (f"the checkpoints of steps {kept} are kept: {fix}, then rerun with --resume." if kept else
                       f"no checkpoint was committed: {fix}, then delete {self.dir.parent} and start again."),
                    EXIT_USER_ERROR, abandon=True) from None

  def _remove_partial(self) -> tuple[str, str]:
    """Deletes the temp dirs of failed writes (Orbax's `<step>.orbax-checkpoint-tmp*`): (removed, left) names."""
    removed, left = [], []
    for tmp in sorted(self.dir.glob("*.orbax-checkpoint-tmp*")):
      try:
        shutil.rmtree(tmp)
        removed.append(tmp.name)
      except OSError:
        left.append(tmp.name)
    return " and ".join(removed), " and ".join(left)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def meta(self, step: int) -> dict[str, Any]:
    return json.loads((self.dir / str(step) / "meta" / "metadata").read_text())

  def resolve(self, which: str) -> int:
    """A step number from 'latest', 'best' or a number, with a clear error if there is none."""
    steps = self.steps()
    if not steps:
      raise UserError(f"{self.dir} holds no finished checkpoint; train first or pick another run dir.")
    if which == "latest":
      return steps[-1]
    if which == "best":
      if not self.cfg.best_metric:
        raise UserError(f"--step best needs a best metric (checkpoint.best_metric, read from the run's config.yaml), "
                        f"and {self.dir} has none; use --step latest or a step number ({steps}).")
      scored = [(s, self.read_meta(s)["metrics"]) for s in steps]
      scored = [(s, m[self.cfg.best_metric]) for s, m in scored if m and self.cfg.best_metric in m]
      if not scored:
        raise UserError(f"no checkpoint in {self.dir} has an eval {self.cfg.best_metric!r}; use --step latest.")
      pick = max if self.cfg.best_direction == "max" else min
      return pick(scored, key=lambda sm: sm[1])[0]
    if not which.isdigit() or int(which) not in steps:
      raise UserError(f"--step {which!r} is not best, latest or a saved step ({steps}).")
    return int(which)

  def restore(self, step: int, **abstract: Any) -> dict[str, Any]:
    """Restores only the named items, each into the shardings of its abstract target tree; a step whose files do
    not read back (truncated, corrupted) is a UserError naming it and the steps to use instead."""
    try:
      if "params" in abstract:
        self._check_fits(step, abstract["params"])
      return self._read(step, abstract)
    except UserError:
      raise
    except ValueError as e:  # Orbax's structure / shape mismatches in the other items
      if storage.disk_error(e) is not None or "tensorstore" in str(e).lower():
        raise self._unreadable(step, e) from None
      raise self._misfit(step, str(e).splitlines()[0][:200]) from None
    except Exception as e:  # TensorStore's and JSON's errors of damaged files
      raise self._unreadable(step, e) from None

  def read_meta(self, step: int) -> dict[str, Any]:
    """`meta(step)`, with damaged metadata a UserError as `restore` gives."""
    try:
      return self.meta(step)
    except Exception as e:
      raise self._unreadable(step, e) from None

  def _unreadable(self, step: int, e: BaseException) -> UserError:
    others = [s for s in self.steps() if s != step]
    return UserError(f"checkpoint step {step} in {self.dir} does not read back ({_reason(e)}): its files are damaged; "
                     + (f"use --step latest (the newest that reads back) or another saved step ({others})."
                        if others else "it is the only checkpoint: retrain, or restore its files from a copy."))

  def _read(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in abstract}

  def restore_latest(self, targets: Callable[[dict[str, Any]], dict[str, Any]],
                     set_aside: bool = False) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(step, meta, items) of the newest checkpoint that reads back whole; items per `targets(meta)`.

    `targets` maps a step's meta to the abstract trees to restore (as `restore` takes them). Newer
    steps that fail to read (truncated or corrupted files) are skipped with a warning naming them;
    with `set_aside` they are moved to checkpoints.unreadable/ so that training can write those
    steps again. A checkpoint of another model is still an error, not skipped.
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(self.steps()):
      try:
        meta = self.meta(step)
        abstract = targets(meta)
        if "params" in abstract:
          self._check_fits(step, abstract["params"])
        items = self._read(step, abstract)
      except UserError:
        raise
      except Exception as e:  # Orbax, tensorstore and JSON errors of damaged files
        reason = _reason(e)
        print(f"warning: skipping checkpoint step {step} in {self.dir}, which does not read back ({reason})",
              file=sys.stderr, flush=True)
        skipped.append((step, reason))
        continue
      if set_aside and skipped:
        self._set_aside([s for s, _ in skipped])
      return step, meta, items
    if skipped:
      raise UserError(f"no checkpoint in {self.dir} reads back (step {skipped[0][0]}: {skipped[0][1]}); start a new "
                      "run or restore the files.")
    raise UserError(f"{self.dir} holds no finished checkpoint; train first or pick another run dir.")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable step dirs to checkpoints.unreadable/ (process 0), then rereads the step list."""
    if jax.process_index() == 0:
      away = self.dir.parent / "checkpoints.unreadable"
      for step in steps:
        target = away / str(step)
        n = 1
        while target.exists():
          target, n = away / f"{step}.{n}", n + 1
        storage.move_dir(self.dir / str(step), target)
        print(f"warning: moved the unreadable checkpoint step {step} to {target}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jaxtune: unreadable checkpoints moved")
    self.manager.reload()

  def _check_fits(self, step: int, params: Any) -> None:
    """Saved param paths and shapes must be the target's (checked from metadata, before any read)."""
    saved = ocp.StandardCheckpointer().metadata(self.dir / str(step) / "params").item_metadata.tree
    have = {p: tuple(m.shape) for p, m in params_lib.flatten(saved).items()}
    want = {p: tuple(x.shape) for p, x in params_lib.flatten(params).items()}
    if have != want:
      path = sorted(set(have) ^ set(want)) or sorted(p for p in want if have[p] != want[p])
      raise self._misfit(step, f"first difference: {path[0]}, saved {have.get(path[0])}, model {want.get(path[0])}")

  def _misfit(self, step: int, detail: str) -> UserError:
    return UserError(f"checkpoint step {step} in {self.dir} does not fit this model's state ({detail}); it was "
                     "written for another model or by a jaxtune with another param layout (layers are stacked "
                     "since the scale-out release): retrain, or use the jaxtune that wrote it.")

  def close(self) -> None:
    if not self.failed:
      self.manager.close()


def _reason(e: BaseException) -> str:
  """One line for a read that failed: the exception's type and the start of its first line."""
  first = str(e).splitlines()[0].split(". See full TensorStore details")[0] if str(e) else ""
  return f"{type(e).__name__}: {first[:160]}"
