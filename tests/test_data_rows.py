"""A bad row's error names its file and its own line (or record) there, not its place in the split as loaded:
through a validation_holdout's seeded carve-out (in either part), a directory of files, the data cache's chunks,
per-process tokenising, a stream's shuffled windows and every task's row checks (data/origin.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import transformers
import yaml
from conftest import run_in_process, write_config

from jaxtune import config
from jaxtune.data import cache, classification
from jaxtune.errors import UserError
from jaxtune.tasks import TASKS

N, HOLDOUT, SEED = 40, 8, 0
MULTILINE = (3, 11)  # rows whose review spans 3 lines: a row's line is not its row number + 2


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  tok.eos_token = "[SEP]"  # for the causal-LM rows
  return tok


def held_out() -> list[int]:
  """The file rows that data.validation_holdout=HOLDOUT moves to validation, as splits.load_rows draws them."""
  return sorted(np.random.default_rng(SEED).permutation(N)[:HOLDOUT].tolist())


def reviews_csv(path, bad: int):
  """N reviews as pandas writes them (a review of several lines quoted), review `bad` blank."""
  reviews = [f"review number {i}" for i in range(N)]
  for i in MULTILINE:
    reviews[i] = f"a review\nover three\nlines, number {i}"
  reviews[bad] = "  "
  pd.DataFrame({"review": reviews, "score": ["great", "other"] * (N // 2)}).to_csv(path, index=False)
  return path


def csv_line(row: int) -> int:
  """The line data row `row` of reviews_csv starts on: the header is line 1, each multi-line review adds 2."""
  return row + 2 + 2 * sum(m < row for m in MULTILINE)


def load_config(tmp_path, model_dir, train, **data):
  path = write_config(tmp_path / "c.yaml", model_dir, {"train": train, "test": train})
  raw = yaml.safe_load(path.read_text())
  raw["data"].update({"validation_holdout": HOLDOUT, "cache_dir": "", **data})
  path.write_text(yaml.safe_dump(raw))
  return path, config.load(path)


def bad_row(part: str) -> int:
  """A file row that lands in `part` of the holdout, far enough in that its split row differs."""
  out = held_out()
  return out[5] if part == "validation" else next(r for r in range(20, N) if r not in out)


def empty_review(name: str, path, row: int) -> str:
  return (f"data split {name} ({path}) line {csv_line(row)}, row {row} has an empty or non-text 'review' ('  '); "
          "fill or drop that row.")


@pytest.mark.parametrize("part", ["train", "validation"])
def test_a_held_out_split_names_the_csv_line(tmp_path, minilm_dir, tokenizer, part):
  bad = bad_row(part)
  split_row = (held_out() if part == "validation" else [r for r in range(N) if r not in held_out()]).index(bad)
  assert split_row != bad and csv_line(bad) != bad + 2  # what the old message said is not the file's place
  _, cfg = load_config(tmp_path, minilm_dir, reviews_csv(tmp_path / "t.csv", bad))
  with pytest.raises(UserError) as e:
    classification.load_splits(cfg.data, SEED, tokenizer, ["train", "validation"])
  assert str(e.value) == empty_review(part, tmp_path / "t.csv", bad)


def test_finetune_prints_the_file_line_of_a_held_out_row(tmp_path, minilm_dir, monkeypatch, capsys):
  bad = bad_row("validation")
  path, _ = load_config(tmp_path, minilm_dir, reviews_csv(tmp_path / "t.csv", bad))
  code, err = run_in_process("finetune", "--config", path, "--run-dir", tmp_path / "run", monkeypatch=monkeypatch,
                             capsys=capsys)
  assert code == 2
  assert err == f"error: {empty_review('validation', tmp_path / 't.csv', bad)}\n"


@pytest.mark.parametrize("how", ["cache", "per_host"])
def test_the_cache_and_per_process_rows_name_the_file_line(tmp_path, minilm_dir, tokenizer, monkeypatch, how):
  """The bad row sits in a later cache chunk, or in a process's fetch of a few rows: still its file line."""
  monkeypatch.setattr(cache, "CHUNK_ROWS", 8)
  bad = bad_row("train")
  split_row = [r for r in range(N) if r not in held_out()].index(bad)
  assert split_row >= cache.CHUNK_ROWS
  _, cfg = load_config(tmp_path, minilm_dir, reviews_csv(tmp_path / "t.csv", bad),
                       cache_dir=str(tmp_path / "cache") if how == "cache" else "")
  with pytest.raises(UserError) as e:
    _, data = classification.load_splits(cfg.data, SEED, tokenizer, ["train"], per_host=how == "per_host")
    data["train"].fetch(np.array([0, 1, split_row]))
    data["train"].exchange()
  assert str(e.value) == empty_review("train", tmp_path / "t.csv", bad)


def test_jsonl_rows_are_named_by_line(tmp_path, minilm_dir, tokenizer):
  rows = [{"review": f"r{i}", "score": "meh" if i == 3 else "great"} for i in range(6)]
  lines = [json.dumps(r) for r in rows]
  lines.insert(1, "")  # a blank line, skipped by the reader: row 3 is on line 5
  (tmp_path / "e.jsonl").write_text("\n".join(lines) + "\n")
  _, cfg = load_config(tmp_path, minilm_dir, reviews_csv(tmp_path / "t.csv", 0), validation_holdout=0,
                       test=str(tmp_path / "e.jsonl"))
  with pytest.raises(UserError) as e:
    classification.load_splits(cfg.data, SEED, tokenizer, ["test"], labels=["great", "other"])
  assert str(e.value) == (f"data split test ({tmp_path / 'e.jsonl'}) line 5, row 3 has label 'meh', which the "
                          "training split does not have (labels: ['great', 'other']); fix the row or the label column.")


def test_a_directory_names_the_file_and_its_line(tmp_path, minilm_dir, tokenizer):
  d = tmp_path / "reviews"
  d.mkdir()
  (d / "a.csv").write_text("review,score\n" + "".join(f"a{i},great\nb{i},other\n" for i in range(3)))
  (d / "b.csv").write_text("review,score\nfine,great\n\nokay,other\ngood,\nbad,other\n")  # row 2 has no score
  _, cfg = load_config(tmp_path, minilm_dir, d, validation_holdout=0)
  with pytest.raises(UserError) as e:
    classification.load_splits(cfg.data, SEED, tokenizer, ["train"])
  assert str(e.value) == f"data split train ({d}) {d / 'b.csv'} line 5, row 2 has no 'score'; fill or drop it."


def jsonl(path, rows: list[dict]) -> str:
  """Rows as JSON lines with a blank line after the first: row r > 0 is on line r + 2."""
  lines = [json.dumps(r) for r in rows]
  path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")
  return str(path)


SQUAD = lambda i, start=0: {"id": str(i), "question": "who?", "context": f"Ann {i} met Bob.",
                            "answers": {"text": ["Ann"], "answer_start": [start]}}
# task -> (data section, rows: row 2 is bad, the message's end after "line 4, row 2")
TASK_ROWS = {
    "seq2seq": ({"source_column": "source", "target_column": "target"},
                [{"source": f"s{i}", "target": "" if i == 2 else f"t{i}"} for i in range(4)],
                " has an empty or non-text target (''); fill or drop that row."),
    "token_classification": ({}, [{"tokens": ["Ann", "ran"], "ner_tags": ["B-PER"] if i == 2 else ["B-PER", "O"]}
                                  for i in range(4)],
                             " has 2 words but 1 tags in 'ner_tags'; give one tag per word."),
    "question_answering": ({}, [SQUAD(i, 1 if i == 2 else 0) for i in range(4)],
                           ": answer 'Ann' is not the context's text at answer_start 1 (it reads 'nn '); fix the "
                           "offset (characters, from 0)."),
    "causal_lm": ({"text_column": "text"}, [{"text": " " if i == 2 else f"doc {i}"} for i in range(4)],
                  " has an empty or non-text 'text' (' '); fill or drop that row."),
}


@pytest.mark.parametrize("task", [*TASK_ROWS, "prompt_template"])
def test_every_tasks_row_checks_name_the_line(tmp_path, minilm_dir, tokenizer, task):
  if task == "prompt_template":  # a format the row's value does not take
    data, rows = {"prompt_template": "{n:.1f} =", "response_column": "r"}, [
        {"n": None if i == 2 else i, "r": "x"} for i in range(4)]
    prefix, end = "data.prompt_template does not fit split", (
        " (TypeError: unsupported format string passed to NoneType.__format__); use {column} fields of ['n', 'r'].")
  else:
    (data, rows, end), prefix = TASK_ROWS[task], "data split"
  path = jsonl(tmp_path / "t.jsonl", rows)
  cfg_path, _ = load_config(tmp_path, minilm_dir, path, validation_holdout=0, **data)
  raw = yaml.safe_load(cfg_path.read_text())
  raw["task"] = "causal_lm" if task == "prompt_template" else task
  for column in ("label_column", "text_column"):  # the classification columns write_config sets
    raw["data"].pop(column)
  raw["data"].update(data)
  if task == "question_answering":
    raw["qa"] = {"doc_stride": 16}  # below data.max_len
  cfg_path.write_text(yaml.safe_dump(raw))
  cfg = config.load(cfg_path)
  with pytest.raises(UserError) as e:
    TASKS[cfg.task].load(cfg, tokenizer, ["train"])
  assert str(e.value) == f"{prefix} train ({path}) line 4, row 2{end}"


def test_a_stream_names_the_line_of_a_row_in_a_shuffled_window(tmp_path, minilm_dir, tokenizer):
  path = jsonl(tmp_path / "t.jsonl", [{"text": " " if i == 6 else f"document {i}"} for i in range(12)])
  cfg_path, _ = load_config(tmp_path, minilm_dir, path, validation_holdout=0)
  raw = yaml.safe_load(cfg_path.read_text())
  raw["task"] = "causal_lm"
  raw["data"] = {**{k: raw["data"][k] for k in ("train", "max_len", "cache_dir")}, "text_column": "text",
                 "streaming": True, "stream_shuffle_window": 4}
  cfg_path.write_text(yaml.safe_dump(raw))
  cfg = config.load(cfg_path)
  with pytest.raises(UserError) as e:
    for _ in TASKS["causal_lm"].stream(cfg, tokenizer).batches():
      pass
  assert str(e.value) == (f"data split train ({path}) (epoch 0, window 1) line 8, row 6 has an empty or non-text "
                          "'text' (' '); fill or drop that row.")
