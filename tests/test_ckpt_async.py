"""checkpoint.async_save: a queued save returns before its step commits, a synchronous one after; keep-best and
keep-last delete an older step only once the newer one has committed.

Commits are held back by patching Orbax's local commit (the rename of a finished temp dir), so each test sees a
write in flight for as long as it likes; a fresh read-only Checkpoints lists only committed steps (the writer's
own `steps()` lists a step as soon as it is queued).
"""

from __future__ import annotations

import asyncio
import threading
import time

import jax.numpy as jnp
import pytest
from conftest import write_config
from orbax.checkpoint._src.path import atomicity

from jaxtune import config
from jaxtune.config import CheckpointConfig
from jaxtune.train import loop
from jaxtune.train.checkpoints import Checkpoints

TREE = {"w": jnp.arange(3.0)}


def hold_commits(monkeypatch: pytest.MonkeyPatch, release: threading.Event | None = None,
                 delay: float = 0.0) -> None:
  """Every local checkpoint commit waits for `release` (at most 60 s), then `delay` seconds, before it happens."""
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if release is not None:
      await asyncio.to_thread(release.wait, 60)
    await asyncio.sleep(delay)
    await real(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def committed(run_dir) -> list[int]:
  return Checkpoints(run_dir, read_only=True).steps()


def save(ckpts: Checkpoints, step: int, metrics: dict[str, float] | None = None) -> None:
  ckpts.save(step, TREE, TREE, {"step": jnp.int32(step)}, {}, metrics)


def test_a_queued_save_returns_before_its_commit_a_synchronous_one_after(tmp_path, monkeypatch):
  release = threading.Event()
  hold_commits(monkeypatch, release)
  queued = Checkpoints(tmp_path / "queued", CheckpointConfig())
  assert queued.cfg.async_save
  save(queued, 1)
  assert committed(tmp_path / "queued") == [] and queued.steps() == [1]  # queued, its commit held back
  release.set()
  queued.wait()
  assert committed(tmp_path / "queued") == [1]

  release.clear()
  sync = Checkpoints(tmp_path / "sync", CheckpointConfig(async_save=False))
  threading.Timer(1.0, release.set).start()
  start = time.perf_counter()
  save(sync, 1)
  assert time.perf_counter() - start >= 1.0  # it waited for the held commit
  assert committed(tmp_path / "sync") == [1]  # and returned with the step committed


def test_keep_best_deletes_the_old_best_only_after_the_new_one_commits(tmp_path, monkeypatch):
  release = threading.Event()
  hold_commits(monkeypatch, release)
  cfg = CheckpointConfig(keep_last=1, best_metric="accuracy")
  ckpts = Checkpoints(tmp_path, cfg)
  release.set()
  save(ckpts, 1, {"accuracy": 0.5})
  ckpts.wait()
  release.clear()
  save(ckpts, 2, {"accuracy": 0.9})  # the new latest and best: step 1 is to go
  time.sleep(0.5)  # time enough for a deletion that did not wait
  assert committed(tmp_path) == [1]  # while step 2's write is in flight the old best is still there
  release.set()
  ckpts.wait()
  assert committed(tmp_path) == [2]
  assert Checkpoints(tmp_path, cfg, read_only=True).resolve("best") == 2


@pytest.mark.parametrize("async_save", [True, False])
def test_the_loop_saves_per_async_save(async_save, tiny_bert_dir, reviews, tmp_path, monkeypatch):
  """Through finetune's loop: with async_save false each save has committed when training goes on."""
  path = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 4, "eval_every": 0},
                      checkpoint={"save_every": 2, "keep_last": 3, "save_every_minutes": 0})
  cfg = config.load(path, [f"checkpoint.async_save={str(async_save).lower()}"])
  assert cfg.checkpoint.async_save is async_save
  hold_commits(monkeypatch, delay=1.0)  # every commit comes a second after its write
  seen: dict[int, list[int]] = {}
  real_save = Checkpoints.save

  def save_and_look(self, step, *args):
    real_save(self, step, *args)
    seen[step] = committed(self.dir.parent)

  monkeypatch.setattr(Checkpoints, "save", save_and_look)
  loop.fit(cfg, tmp_path / "run")
  if async_save:
    assert seen == {2: [], 4: [2]}  # step 4's save waited for step 2's commit, never for its own
  else:
    assert seen == {2: [2], 4: [2, 4]}
  assert committed(tmp_path / "run") == [2, 4]  # the end of the run waited for the last commit
