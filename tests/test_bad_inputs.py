"""Each bad input to the scripts gets one `error:` line and exit code 2, with no traceback, before anything is written.

The scripts run in this process (runpy, `JAXTUNE_NO_HOST_TUNING=1` so nothing re-executes), which
keeps 30-odd cases to seconds; tests/test_scripts.py checks the same contract on real processes.
Every file already on disk (a trained run, configs, data) must be byte-identical afterwards, and a
new run dir must not exist. The machine runs tests as root, so "read-only" is a run dir below a
regular file (NotADirectoryError) and a full disk is an ENOSPC raised by the first write.
"""

from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest
import yaml
from conftest import run_in_process, save_tiny_bert, snapshot, write_config
from test_gguf import write_tiny_llama

from jaxtune import config, storage
from jaxtune.train import loop


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir, minilm_dir, reviews):
  """Files the cases point at: a trained 2-step run, its config, bad data and model files."""
  d = tmp_path_factory.mktemp("bad_inputs")
  cfg = write_config(d / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 2})
  loop.fit(config.load(cfg), d / "run")
  (d / "not_mapping.yaml").write_text("- model\n- data\n")
  (d / "broken.yaml").write_text("model: [path\n")
  (d / "latin1.csv").write_bytes("review,score\nun caf\xe9 tr\xe8s bon,great\nbof,other\n".encode("latin-1"))
  (d / "broken.json").write_text('{"review": "good", "score": ')
  (d / "header_only.csv").write_text("review,score\n")
  (d / "one_class.csv").write_text("review,score\n" + "".join(f"review {i},great\n" for i in range(40)))
  (d / "new_label.csv").write_text("review,score\ngood,great\nsuperb,superb\n")
  (d / "no_config").mkdir()
  (d / "no_weights").mkdir()
  shutil.copy(tiny_bert_dir / "config.json", d / "no_weights" / "config.json")
  write_tiny_llama(d / "qwen.gguf", {"output_norm.weight": np.ones(12, np.float32)}, arch="qwen2")
  save_tiny_bert(d / "small_vocab", minilm_dir, vocab_size=1000)
  (d / "a_file").write_text("not a directory")
  (d / "config_only").mkdir()
  shutil.copy(d / "run" / "config.yaml", d / "config_only" / "config.yaml")
  # the same run, its model since replaced by a deeper one: its checkpoint no longer fits
  shutil.copytree(d / "run", d / "other_model_run")
  save_tiny_bert(d / "deeper", minilm_dir, num_hidden_layers=3)
  saved = yaml.safe_load((d / "run" / "config.yaml").read_text())
  saved["model"]["path"] = str(d / "deeper")
  (d / "other_model_run" / "config.yaml").write_text(yaml.safe_dump(saved))
  return d


def full_disk(monkeypatch):
  def no_space(path, text):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  monkeypatch.setattr(storage, "write_text", no_space)


# name -> (script, args with {d} for the world dir and {new} for a fresh run dir, message, set-up or None)
CASES = {
    "config file missing": ("finetune", "--config {d}/nope.yaml", "config file {d}/nope.yaml does not exist"),
    "YAML not a mapping": ("finetune", "--config {d}/not_mapping.yaml", "must hold a mapping of sections, not list"),
    "YAML syntax": ("finetune", "--config {d}/broken.yaml", "is not valid YAML"),
    "unknown key": ("finetune", "--config {d}/c.yaml optim.lrate=1", "no key 'lrate' at optim"),
    "wrong type": ("finetune", "--config {d}/c.yaml train.batch_size=abc", "train.batch_size must be int, got 'abc'"),
    "bad choice": ("finetune", "--config {d}/c.yaml task=regression", "task is 'regression'; expected one of"),
    "override without =": ("finetune", "--config {d}/c.yaml optim.lr", "is not of the form section.key=value"),
    "out of range": ("finetune", "--config {d}/c.yaml train.batch_size=0", "train.batch_size is 0; it must be >= 1"),
    "data file missing": ("finetune", "--config {d}/c.yaml data.train={d}/missing.csv", "missing.csv does not exist"),
    "non-UTF-8 data": ("finetune", "--config {d}/c.yaml data.train={d}/latin1.csv",
                       "latin1.csv could not be read (UnicodeDecodeError"),
    "unparseable data": ("finetune", "--config {d}/c.yaml data.train={d}/broken.json", "broken.json could not be read"),
    "column missing": ("finetune", "--config {d}/c.yaml data.text_column=body", "has no column 'body'"),
    "holdout takes every row": ("finetune", "--config {d}/c.yaml data.validation_holdout=96",
                                "validation_holdout=96 leaves no training rows out of 96"),
    "split without rows": ("finetune", "--config {d}/c.yaml data.train={d}/header_only.csv data.validation_holdout=0",
                           "has no rows"),
    "one class": ("finetune", "--config {d}/c.yaml data.train={d}/one_class.csv",
                  "has 1 distinct label(s); classification needs at least 2"),
    "model dir without config.json": ("finetune", "--config {d}/c.yaml model.path={d}/no_config",
                                      "no_config has no config.json"),
    "model dir without weights": ("finetune", "--config {d}/c.yaml model.path={d}/no_weights",
                                  "no_weights has neither model.safetensors"),
    "unsupported GGUF architecture": ("finetune", "--config {d}/c.yaml task=causal_lm model.path={d}/qwen.gguf "
                                      "model.tokenizer={d}/run/tokenizer",
                                      "holds a 'qwen2' model, but only GGUF files with general.architecture 'llama'"),
    "max_len beyond the positions": ("finetune", "--config {d}/c.yaml data.max_len=256 data.length_buckets=[256]",
                                     "data.max_len=256 is longer than"),
    "token ids beyond the vocabulary": ("finetune", "--config {d}/c.yaml model.path={d}/small_vocab",
                                        "has only 1000 embeddings"),
    "encoder for a decoder task": ("finetune", "--config {d}/c.yaml task=causal_lm",
                                   "task causal_lm needs a decoder model"),
    "run dir holds a run": ("finetune", "--config {d}/c.yaml --run-dir {d}/run", "already holds a run; pass --resume"),
    "resume of no run": ("finetune", "--config {d}/c.yaml --resume", "holds no run (no config.yaml)"),
    "resume without a checkpoint": ("finetune", "--config {d}/c.yaml --run-dir {d}/config_only --resume",
                                    "holds no finished checkpoint to resume from"),
    "resume with a new batch size and seed": ("finetune", "--config {d}/c.yaml --run-dir {d}/run --resume "
                                              "train.batch_size=4 train.seed=1",
                                              "train.batch_size: 8 -> 4; train.seed: 0 -> 1"),
    "resume of a finished run": ("finetune", "--config {d}/c.yaml --run-dir {d}/run --resume",
                                 "already reached its last step (2 of 2)"),
    "resume onto another model": ("finetune", "--config {d}/other_model_run/config.yaml --run-dir {d}/other_model_run "
                                  "--resume", "does not fit this model's state"),
    "run dir below a file": ("finetune", "--config {d}/c.yaml --run-dir {d}/a_file/run", "cannot read or write"),
    "full disk": ("finetune", "--config {d}/c.yaml", "No space left on device"),
    "evaluate --output in a missing dir": ("evaluate", "--checkpoint {d}/run --output {d}/missing/m.json",
                                           "directory {d}/missing does not exist"),
    "evaluate labels unseen in training": ("evaluate", "--checkpoint {d}/run --data {d}/new_label.csv",
                                           "has label 'superb', which the training split does not have"),
    "evaluate a step never saved": ("evaluate", "--checkpoint {d}/run --step 99", "is not best, latest or a saved"),
    "evaluate a dir without a run": ("evaluate", "--checkpoint {d}/no_config", "has no checkpoints/ directory"),
    "export a step never saved": ("export_hf", "--checkpoint {d}/run --step 7 --output {new}",
                                  "is not best, latest or a saved"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line_and_changes_nothing(name, world, tmp_path, monkeypatch, capsys):
  script, args, message = CASES[name]
  fill = lambda text: text.format(d=world, new=tmp_path / "new")
  argv = fill(args).split()
  if script == "finetune" and "--run-dir" not in argv:
    argv += ["--run-dir", str(tmp_path / "new")]
  if name == "full disk":
    full_disk(monkeypatch)
  before = snapshot(world)
  code, err = run_in_process(script, *argv, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 2, err
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err  # one line, nothing else
  assert fill(message) in err, err
  assert snapshot(world) == before
  assert not (tmp_path / "new").exists()
  assert not list(world.rglob(".lock"))
