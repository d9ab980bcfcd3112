"""Per-host data (data/hostrows.py, feed.HostFeed): each of two processes, simulated by two threads sharing a
fake all-gather, tokenises only the train rows its devices hold, and builds exactly the batch rows that a
process which encoded the whole split builds, in the same order (tests/test_multihost.py runs real processes)."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pandas as pd
import pytest
import transformers
import yaml
from conftest import seq2seq_config, write_config
from jax.experimental import multihost_utils

from jaxtune import config
from jaxtune.data import batching, feed, hostrows
from jaxtune.errors import UserError
from jaxtune.tasks import TASKS

BATCH, STEPS = 8, 12  # 80 train rows: 10 steps an epoch, so the run enters a second epoch
PARTS = (slice(0, 4), slice(4, 8))  # the batch rows each process's devices hold


def in_two_processes(monkeypatch, work):
  """[work(0), work(1)], run at once in two threads that jax sees as processes 0 and 1 of 2."""
  local, slots, barrier = threading.local(), [None, None], threading.Barrier(2, timeout=60)

  def allgather(x):
    slots[local.pid] = np.asarray(x)
    barrier.wait()
    out = np.stack(slots)
    barrier.wait()
    return out

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: local.pid)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  results = [None, None]

  def run(pid):
    local.pid = pid
    try:
      results[pid] = work(pid)
    except BaseException as e:  # handed to the main thread; a thread that fails alone leaves the other to time out
      results[pid] = e

  threads = [threading.Thread(target=run, args=(pid,)) for pid in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def tokenizer_for(minilm_dir):
  """A fresh instance per thread: one fast tokenizer is not safe to call from two threads at once."""
  tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"  # causal-LM data needs an EOS
  return tok


def task_config(tmp_path, minilm_dir, reviews, task: str, group_by_length: bool):
  path = tmp_path / f"{task}.yaml"
  train = {"batch_size": BATCH, "max_steps": STEPS}
  if task == "seq2seq":
    seq2seq_config(path, minilm_dir, reviews, train=train)
  else:
    write_config(path, minilm_dir, reviews, train=train)
  raw = yaml.safe_load(path.read_text())
  raw["data"]["group_by_length"] = group_by_length
  if task == "causal_lm":
    raw["task"] = "causal_lm"
    raw["data"].update(prompt_template="{review:.150}\n", response_column="score")
    del raw["data"]["label_column"]
  if task == "token_classification":  # each word tagged by its case
    frame = pd.read_csv(reviews["train"])
    words = [r.split()[:30] for r in frame["review"]]
    pd.DataFrame({"tokens": words, "ner_tags": [["CAP" if w[0].isupper() else "O" for w in ws] for ws in words]}
                 ).to_json(tmp_path / "tags.jsonl", orient="records", lines=True)
    raw["task"] = task
    raw["data"].update(train=str(tmp_path / "tags.jsonl"))
    for key in ("label_column", "text_column", "test"):
      del raw["data"][key]
  path.write_text(yaml.safe_dump(raw))
  return config.load(path)


@pytest.mark.parametrize("group_by_length", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("task", ["classification", "token_classification", "seq2seq", "causal_lm"])
def test_each_process_tokenises_its_rows_and_builds_the_whole_splits_batches(
    monkeypatch, tmp_path, minilm_dir, reviews, task, group_by_length):
  cfg = task_config(tmp_path, minilm_dir, reviews, task, group_by_length)
  t = TASKS[task]
  _, whole = t.load(cfg, tokenizer_for(minilm_dir), ["train"])
  want = feed.SplitFeed(whole["train"], BATCH, cfg.train.seed, group_by_length)

  def process(pid):
    _, splits = t.load(cfg, tokenizer_for(minilm_dir), ["train"], per_host=True)
    assert isinstance(splits["train"], hostrows.Rows)
    return feed.HostFeed(splits["train"], BATCH, cfg.train.seed, group_by_length, PARTS[pid], STEPS)

  feeds = in_two_processes(monkeypatch, process)
  for got in feeds:
    if isinstance(got, BaseException):
      raise got
  n = len(whole["train"])
  counts = feeds[0].tokenized
  assert feeds[1].tokenized == counts and len(counts) == 2
  fed = [np.unique(np.concatenate([rows[part] for _, rows in want.batches(0, STEPS)])) for part in PARTS]
  if group_by_length:  # an equal block for the lengths, then its own rows outside it
    assert all(c < n for c in counts) and sum(counts) >= n
  else:  # exactly the rows its devices hold over the run
    assert counts == [len(f) for f in fed]
  assert all(c <= 0.8 * n for c in counts), counts
  for pid, host in enumerate(feeds):
    assert host.data.max_token_id == whole["train"].max_token_id and len(host.data) == n
    assert host.position(STEPS) == want.position(STEPS)
    for (data, rows), (_, expected) in zip(host.batches(0, STEPS), want.batches(0, STEPS), strict=True):
      np.testing.assert_array_equal(rows, expected)
      assert data.lengths[rows].sum() == whole["train"].lengths[rows].sum()
      built, reference = (t.collate(d, rows, BATCH, cfg, PARTS[pid]) for d in (data, whole["train"]))
      assert built.keys() == reference.keys()
      for key in reference:
        np.testing.assert_array_equal(built[key], reference[key], err_msg=key)


def test_a_bad_row_stops_every_process_with_the_one_process_message(monkeypatch, tmp_path, minilm_dir):
  """The bad row is held by process 1 only; both raise the error a one-process run gives, numbered in the split."""
  bad = int(batching.train_batches(np.zeros(40), BATCH, 0, 0, False)[0][5])
  reviews = [f"review number {i}" for i in range(40)]
  reviews[bad] = "  "
  pd.DataFrame({"review": reviews, "score": ["great", "other"] * 20}).to_csv(tmp_path / "t.csv", index=False)
  path = write_config(tmp_path / "c.yaml", minilm_dir, {"train": tmp_path / "t.csv", "test": tmp_path / "t.csv"},
                      train={"batch_size": BATCH, "max_steps": 1, "seed": 0})
  raw = yaml.safe_load(path.read_text())
  raw["data"]["validation_holdout"] = 0
  path.write_text(yaml.safe_dump(raw))
  cfg = config.load(path)
  t = TASKS["classification"]

  def process(pid):
    _, splits = t.load(cfg, tokenizer_for(minilm_dir), ["train"], per_host=True)
    return feed.HostFeed(splits["train"], BATCH, 0, False, PARTS[pid], 1)

  errors = in_two_processes(monkeypatch, process)
  for e in errors:
    assert isinstance(e, UserError) and f"row {bad} has an empty or non-text 'review'" in str(e), e
