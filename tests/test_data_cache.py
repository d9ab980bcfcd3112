"""The tokenised-data cache (data/cache.py): a second load reads the entry (and tokenises nothing), its rows equal
freshly tokenised ones exactly, every input that can change a row names another entry, and a damaged entry is
rebuilt rather than read."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import transformers
import yaml
from conftest import seq2seq_config, write_config

from jaxtune import config
from jaxtune.data import cache, classification, hostrows, lm, qa, seq2seq, tagging
from jaxtune.errors import UserError
from jaxtune.eval import evaluate
from jaxtune.tasks import TASKS
from jaxtune.train import loop


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def smol(tiny_llama_dir):
  return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def cfg(tmp_path, tiny_bert_dir, reviews):
  train = tmp_path / "train.csv"
  shutil.copy(reviews["train"], train)
  return config.load(write_config(tmp_path / "c.yaml", tiny_bert_dir, {**reviews, "train": train}),
                     [f"data.cache_dir={tmp_path / 'cache'}"])


def with_data(cfg, **kw):
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **kw))


@pytest.fixture
def encodes(monkeypatch):
  """How many splits classification.encode tokenised (whole splits or chunks of one) since the test began."""
  calls, real = [], classification.encode
  monkeypatch.setattr(classification, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def load(cfg, tokenizer, names=("train", "validation"), **kw):
  return TASKS["classification"].load(cfg, tokenizer, list(names), **kw)[1]


def assert_same_rows(got, want):
  assert type(got) is type(want) and len(got) == len(want)
  for f in dataclasses.fields(want):
    a, b = getattr(got, f.name), getattr(want, f.name)
    if isinstance(b, np.ndarray):
      assert a.dtype == b.dtype, f.name
      np.testing.assert_array_equal(a, b, err_msg=f.name)
    else:
      assert len(a) == len(b), f.name
      for x, y in zip(a, b, strict=True):
        if isinstance(y, np.ndarray):
          assert x.dtype == y.dtype, f.name
          np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
          assert x == y, f.name
  np.testing.assert_array_equal(got.lengths, want.lengths)
  assert got.max_token_id == want.max_token_id


def test_a_second_load_reads_the_entry_and_equals_fresh_tokenising(cfg, tokenizer, encodes):
  fresh = load(with_data(cfg, cache_dir=""), tokenizer)
  assert len(encodes) == 2 and not Path(cfg.data.cache_dir).exists()  # "" turns the cache off
  load(cfg, tokenizer)
  assert len(encodes) == 4  # built: one chunk per split
  cached = load(cfg, tokenizer)
  assert len(encodes) == 4  # read: nothing tokenised
  for name in fresh:
    assert isinstance(cached[name].input_ids, cache.Ragged)  # memory-mapped, not lists in memory
    assert_same_rows(cached[name], fresh[name])


def test_built_in_chunks_equals_built_whole(cfg, tokenizer, encodes, monkeypatch):
  monkeypatch.setattr(cache, "CHUNK_ROWS", 7)
  fresh = load(with_data(cfg, cache_dir=""), tokenizer, ["train"])["train"]
  built = load(cfg, tokenizer, ["train"])["train"]
  assert len(encodes) == 1 + -(-len(fresh) // 7)
  assert_same_rows(built, fresh)


def test_what_changes_rows_names_another_entry_and_nothing_else_does(cfg, tokenizer, encodes, tmp_path, minilm_dir):
  load(cfg, tokenizer, ["train"])
  assert len(encodes) == 1
  unchanged = [dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.5)),
               with_data(cfg, length_buckets=(64,), group_by_length=True),
               with_data(cfg, train=str(tmp_path / "renamed.csv"))]  # the same bytes under another name
  shutil.copy(cfg.data.train, tmp_path / "renamed.csv")
  for other in unchanged:
    load(other, tokenizer, ["train"])
  assert len(encodes) == 1
  uncased = transformers.AutoTokenizer.from_pretrained(minilm_dir, do_lower_case=False)
  assert uncased("Great")["input_ids"] != tokenizer("Great")["input_ids"]  # a tokenizer that encodes differently
  load(cfg, uncased, ["train"])
  assert len(encodes) == 2
  load(with_data(cfg, max_len=32, length_buckets=(32,)), tokenizer, ["train"])
  assert len(encodes) == 3
  load(with_data(cfg, validation_holdout=17), tokenizer, ["train"])  # other rows held out: other train rows
  assert len(encodes) == 4
  frame = pd.read_csv(cfg.data.train)
  frame.loc[5, "review"] = "An edited review."
  frame.to_csv(cfg.data.train, index=False)
  edited = load(cfg, tokenizer, ["train"])["train"]
  assert len(encodes) == 5
  assert_same_rows(edited, load(with_data(cfg, cache_dir=""), tokenizer, ["train"])["train"])
  load(cfg, tokenizer, ["train"])
  assert len(encodes) == 6  # the uncached load above, then a hit


def only_entry(cfg):
  (entry,) = [p for p in Path(cfg.data.cache_dir).iterdir() if not p.name.startswith("tmp-")]
  return entry


@pytest.mark.parametrize("damage", ["truncated tokens", "no manifest", "flipped offsets", "stale format"])
def test_a_damaged_entry_is_rebuilt(cfg, tokenizer, encodes, damage):
  load(cfg, tokenizer, ["train"])
  want = load(with_data(cfg, cache_dir=""), tokenizer, ["train"])["train"]  # not the entry's memory map, damaged next
  entry = only_entry(cfg)
  if damage == "truncated tokens":
    with open(entry / "input_ids.bin", "r+b") as f:
      f.truncate(100)
  elif damage == "no manifest":  # as a build killed before its last write (it would be in a tmp- dir, even)
    (entry / "manifest.json").unlink()
  elif damage == "flipped offsets":
    raw = bytearray((entry / "input_ids.off").read_bytes())
    raw[8] ^= 1
    (entry / "input_ids.off").write_bytes(bytes(raw))
  else:
    (entry / "manifest.json").write_text((entry / "manifest.json").read_text().replace('"format": 1', '"format": 0'))
  got = load(cfg, tokenizer, ["train"])["train"]
  assert len(encodes) == 3  # rebuilt
  assert_same_rows(got, want)
  load(cfg, tokenizer, ["train"])
  assert len(encodes) == 3 and only_entry(cfg) == entry


def test_per_host_reads_only_its_rows_from_an_entry_and_never_builds_one(cfg, tokenizer, encodes):
  cold = load(cfg, tokenizer, ["train"], per_host=True)["train"]
  assert isinstance(cold, hostrows.Rows) and not Path(cfg.data.cache_dir).exists()
  whole = load(cfg, tokenizer, ["train"])["train"]
  assert len(encodes) == 1
  rows = load(cfg, tokenizer, ["train"], per_host=True)["train"]
  assert isinstance(rows, hostrows.Rows) and len(rows) == len(whole)
  mine = np.array([3, 40, 7, 11])
  rows.fetch(mine)
  rows.exchange()
  assert len(encodes) == 1 and rows.count == 4  # read from the entry, not tokenised
  for r in mine:
    np.testing.assert_array_equal(rows.input_ids[r], whole.input_ids[r])
    assert rows.labels[r] == whole.labels[r] and rows.lengths[r] == whole.lengths[r]
  with pytest.raises(IndexError):
    rows.input_ids[4]


def test_evaluate_reads_the_entry_the_training_run_built(cfg, tokenizer, tmp_path, monkeypatch):
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1, eval_every=0))
  loop.fit(cfg, tmp_path / "run")
  entries = set(Path(cfg.data.cache_dir).iterdir())
  assert len(entries) == 2  # train and validation

  def tokenise(*args, **kwargs):
    raise AssertionError("evaluate.py tokenised the validation split instead of reading its cache entry")

  monkeypatch.setattr(classification, "encode", tokenise)
  result = evaluate.evaluate_checkpoint(tmp_path / "run", "latest", split="validation")
  assert result["num_examples"] == cfg.data.validation_holdout  # the saved tokenizer copy keys the same entry
  assert set(Path(cfg.data.cache_dir).iterdir()) == entries


def lm_rows(smol, n=40):
  texts = [f"Review {i}: " + "the tea was fine and " * (i % 13) + "done." for i in range(n)]
  return datasets.Dataset.from_dict({"text": texts, "prompt": [t[:30] for t in texts],
                                     "response": [t[30:] or "x" for t in texts]})


@pytest.mark.parametrize("form", [{"text_column": "text"}, {"text_column": "text", "pack_text": False},
                                  {"prompt_column": "prompt", "response_column": "response"}],
                         ids=["packed", "padded", "prompt_response"])
def test_lm_rows_built_a_chunk_at_a_time_equal_the_whole_split(smol, tmp_path, monkeypatch, form):
  ds, seq_len = lm_rows(smol), 24
  fresh = lm.load_lm_split(ds, smol, "train", seq_len, **form)
  monkeypatch.setattr(cache, "CHUNK_ROWS", 6)  # packed rows cross chunk ends
  built = lm.load_lm_split(ds, smol, "train", seq_len, cache_dir=str(tmp_path), **form)
  assert isinstance(built.tokens, np.ndarray) and not built.tokens.flags.writeable  # memory-mapped
  assert_same_rows(built, fresh)
  if "pack_text" in form or "prompt_column" in form:
    assert len(fresh.truncated_rows) > 0  # the row numbers offset by each chunk's start are exercised

  def tokenise(*args, **kwargs):
    raise AssertionError("tokenised again")

  monkeypatch.setattr(lm.Form, "encode", tokenise)
  assert_same_rows(lm.load_lm_split(ds, smol, "train", seq_len, cache_dir=str(tmp_path), **form), fresh)
  assert len(list(tmp_path.iterdir())) == 1


def test_a_bad_row_past_the_first_chunk_is_numbered_within_the_split(smol, tmp_path, monkeypatch):
  monkeypatch.setattr(cache, "CHUNK_ROWS", 6)
  ds = datasets.Dataset.from_dict({"text": [f"doc {i}" if i != 9 else "  " for i in range(20)]})
  with pytest.raises(UserError, match="row 9 has an empty"):
    lm.load_lm_split(ds, smol, "train", 16, cache_dir=str(tmp_path), text_column="text")
  assert not list(tmp_path.iterdir())  # no entry, and the half-built one is removed


def test_every_tasks_split_round_trips_through_an_entry(tmp_path):
  """The store holds each task's encoded split: ragged ids, (T x 2) offsets, texts and objects."""
  ids = [np.arange(n, dtype=np.int32) + 5 for n in (3, 1, 4)]
  splits = [
      seq2seq.Pairs(ids, [i[:2] for i in ids], ["a", "bé", "c"], ["x", "", "zz"]),
      tagging.Tagged(ids, [np.zeros_like(i) for i in ids], [i - 5 for i in ids], np.array([1, 2, 3], np.int32)),
      qa.Features(ids, [np.zeros_like(i) for i in ids], np.array([0, 1, 2], np.int32), np.array([0, 1, 3], np.int32),
                  [np.stack([i, i + 1], axis=1) for i in ids], np.array([0, 0, 1], np.int32),
                  [qa.Example("q0", "who?", "me", ("me",), (0,)), qa.Example("q1", "what?", "it", (), ())])]
  store = cache.Store(tmp_path)
  for n, split in enumerate(splits):
    built = store.build(str(n), [split])
    assert_same_rows(built, split)
    assert_same_rows(store.open(str(n)), split)
  pairs = store.open("0")
  assert pairs.sources[1:] == ["bé", "c"] and pairs.target_lengths.tolist() == [2, 1, 2]


def task_config(tmp_path, minilm_dir, reviews, task):
  """A seq2seq, NER or QA config on rows made from the reviews, with a validation holdout and a cache."""
  path, frame = tmp_path / "c.yaml", pd.read_csv(reviews["train"])
  if task == "seq2seq":
    seq2seq_config(path, minilm_dir, reviews)
  else:
    write_config(path, minilm_dir, reviews)
  raw = yaml.safe_load(path.read_text())
  if task == "token_classification":  # each word tagged by its case
    words = [r.split()[:30] for r in frame["review"]]
    rows = [{"tokens": ws, "ner_tags": ["CAP" if w[0].isupper() else "O" for w in ws]} for ws in words]
  elif task == "question_answering":  # what is the review's first word
    rows = [{"id": f"q{i}", "question": "Which word comes first?", "context": r[:300],
             "answers": {"text": [r.split()[0]], "answer_start": [0]}} for i, r in enumerate(frame["review"])]
    raw["qa"] = {"doc_stride": 16}  # a window of max_len 64 over contexts of up to 300 characters
  if task != "seq2seq":
    pd.DataFrame(rows).to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    raw["task"] = task
    raw["data"].update(train=str(tmp_path / "rows.jsonl"))
    for key in ("label_column", "text_column", "test"):
      del raw["data"][key]
  raw["data"]["cache_dir"] = str(tmp_path / "cache")
  path.write_text(yaml.safe_dump(raw))
  return config.load(path)


ENCODERS = {"seq2seq": (seq2seq, "encode"), "token_classification": (tagging, "encode"),
            "question_answering": (qa, "featurize")}


@pytest.mark.parametrize("task", list(ENCODERS))
def test_seq2seq_ner_and_qa_splits_are_read_from_their_entries(task, tmp_path, minilm_dir, reviews, tokenizer,
                                                              monkeypatch):
  cfg = task_config(tmp_path, minilm_dir, reviews, task)
  t, names, root = TASKS[task], ["train", "validation"], Path(cfg.data.cache_dir)
  fresh = t.load(with_data(cfg, cache_dir=""), tokenizer, names)[1]
  assert not root.exists()
  calls, (module, fn) = [], ENCODERS[task]
  real = getattr(module, fn)
  monkeypatch.setattr(module, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
  built = t.load(cfg, tokenizer, names)[1]
  assert len(calls) == 2 and len(list(root.iterdir())) == 2  # one entry per split
  cached = t.load(cfg, tokenizer, names)[1]
  assert len(calls) == 2  # read: nothing tokenised
  for n in names:
    assert isinstance(cached[n].input_ids, cache.Ragged)  # memory-mapped
    assert_same_rows(built[n], fresh[n])
    assert_same_rows(cached[n], fresh[n])
  t.load(with_data(cfg, max_len=32, length_buckets=(32,)), tokenizer, ["train"])
  assert len(calls) == 3  # what changes rows names another entry
  if task != "question_answering":  # a process of a multi-process run reads only its rows from the entry
    rows, mine = t.load(cfg, tokenizer, ["train"], per_host=True)[1]["train"], np.array([3, 40, 7])
    assert isinstance(rows, hostrows.Rows)
    rows.fetch(mine)
    rows.exchange()
    assert len(calls) == 3 and rows.count == 3
    for r in mine:
      np.testing.assert_array_equal(rows.input_ids[r], fresh["train"].input_ids[r])
