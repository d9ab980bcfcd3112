"""A damaged model file (weights, config.json, GGUF, tokenizer) is one `error:` line and exit code 2, changing nothing.

The same harness as tests/test_bad_inputs.py (runpy in this process, `JAXTUNE_NO_HOST_TUNING=1`): each case
must end before the run dir is created, leave every file already on disk byte-identical and print no traceback.
The damaged files are copies of the tiny fixtures, cut short, overwritten or deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_in_process, snapshot, write_config
from safetensors.numpy import load_file, save_file
from test_gguf import write_tiny_llama

from jaxtune import config
from jaxtune.train import loop

GARBAGE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def truncate(path: Path, size: int) -> None:
  path.write_bytes(path.read_bytes()[:size])


def model_copy(d: Path, name: str, source: Path) -> Path:
  return Path(shutil.copytree(source, d / name))


def sharded(d: Path, name: str, source: Path) -> Path:
  """`source` re-saved as two safetensors shards and an index, the way save_pretrained shards a large model."""
  out = model_copy(d, name, source)
  tensors = load_file(out / "model.safetensors")
  (out / "model.safetensors").unlink()
  keys = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
    shard = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, out / shard, metadata={"format": "pt"})
    weight_map |= dict.fromkeys(part, shard)
  (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return out


def tiny_gguf(path: Path) -> Path:
  """A complete 1-layer llama GGUF (write_tiny_llama's dims)."""
  rng = np.random.default_rng(0)
  shapes = {"token_embd": (10, 12), "output_norm": (12,), "blk.0.attn_norm": (12,), "blk.0.ffn_norm": (12,),
            "blk.0.attn_q": (12, 12), "blk.0.attn_k": (4, 12), "blk.0.attn_v": (4, 12), "blk.0.attn_output": (12, 12),
            "blk.0.ffn_gate": (20, 12), "blk.0.ffn_up": (20, 12), "blk.0.ffn_down": (12, 20)}
  return write_tiny_llama(path, {f"{k}.weight": rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir, reviews):
  """The damaged files the cases point at, and a trained run (frozen embeddings) whose base model is damaged."""
  d = tmp_path_factory.mktemp("corrupt_files")
  write_config(d / "c.yaml", tiny_bert_dir, reviews)
  size = (tiny_bert_dir / "model.safetensors").stat().st_size
  truncate(model_copy(d, "half", tiny_bert_dir) / "model.safetensors", size // 2)
  (model_copy(d, "garbage", tiny_bert_dir) / "model.safetensors").write_bytes(GARBAGE)
  (model_copy(d, "empty", tiny_bert_dir) / "model.safetensors").write_bytes(b"")
  (model_copy(d, "header_list", tiny_bert_dir) / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
  header = 8 + int.from_bytes((tiny_bert_dir / "model.safetensors").read_bytes()[:8], "little")
  truncate(model_copy(d, "header_cut", tiny_bert_dir) / "model.safetensors", header // 2)
  (sharded(d, "shard_missing", tiny_bert_dir) / "model-00002-of-00002.safetensors").unlink()
  shard = sharded(d, "shard_cut", tiny_bert_dir) / "model-00002-of-00002.safetensors"
  truncate(shard, shard.stat().st_size // 2)
  (model_copy(d, "config_broken", tiny_bert_dir) / "config.json").write_text('{"model_type": "bert", ')
  (model_copy(d, "config_list", tiny_bert_dir) / "config.json").write_text("[1, 2]")
  cfg = json.loads((tiny_bert_dir / "config.json").read_text())
  cfg.pop("model_type")
  (model_copy(d, "config_untyped", tiny_bert_dir) / "config.json").write_text(json.dumps(cfg))
  no_tokenizer = model_copy(d, "no_tokenizer", tiny_bert_dir)
  for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    (no_tokenizer / name).unlink(missing_ok=True)
  (model_copy(d, "tokenizer_broken", tiny_bert_dir) / "tokenizer.json").write_text('{"version": "1.0", "model": ')
  garbage_vocab = model_copy(d, "vocab_garbage", tiny_bert_dir)
  (garbage_vocab / "tokenizer.json").unlink()
  (garbage_vocab / "vocab.txt").write_bytes(GARBAGE)

  good = tiny_gguf(d / "good.gguf")
  tensors = gguf.GGUFReader(good).tensors
  last = tensors[-1]
  shutil.copy(good, d / "data_cut.gguf")
  truncate(d / "data_cut.gguf", int(last.data_offset + last.n_bytes // 2))
  shutil.copy(good, d / "header_cut.gguf")
  truncate(d / "header_cut.gguf", 200)
  (d / "garbage.gguf").write_bytes(GARBAGE)
  (d / "magic_garbage.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + GARBAGE)
  data = good.read_bytes()  # general.architecture's value, "llama", overwritten with bytes that are not UTF-8
  at = data.index(b"llama", data.index(b"general.architecture"))
  (d / "bad_string.gguf").write_bytes(data[:at] + b"\xff\xfe" + data[at + 2:])

  # a run that froze the embeddings (read from the base model again by evaluate and export), its base then damaged
  base = model_copy(d, "base", tiny_bert_dir)
  run_cfg = write_config(d / "frozen.yaml", base, reviews, train={"max_steps": 1, "eval_every": 1},
                         model={"path": str(base), "freeze": [r"bert\.embeddings\..*"]})
  loop.fit(config.load(run_cfg), d / "run")
  truncate(base / "model.safetensors", size // 2)
  return d


def gguf_args(name: str) -> str:
  return f"--config {{d}}/c.yaml task=causal_lm model.path={{d}}/{name} model.tokenizer={{d}}/base"


# name -> (script, args with {d} for the world dir and {new} for a fresh run or output dir, message)
CASES = {
    "safetensors cut in half": ("finetune", "--config {d}/c.yaml model.path={d}/half",
                                "{d}/half/model.safetensors is not a readable safetensors file"),
    "safetensors cut in its header": ("finetune", "--config {d}/c.yaml model.path={d}/header_cut",
                                      "{d}/header_cut/model.safetensors is not a readable safetensors file"),
    "safetensors of garbage": ("finetune", "--config {d}/c.yaml model.path={d}/garbage",
                               "{d}/garbage/model.safetensors is not a readable safetensors file"),
    "safetensors of zero bytes": ("finetune", "--config {d}/c.yaml model.path={d}/empty",
                                  "{d}/empty/model.safetensors is not a readable safetensors file"),
    "safetensors header not an object": ("finetune", "--config {d}/c.yaml model.path={d}/header_list",
                                         "{d}/header_list/model.safetensors is not a readable safetensors file"),
    "index names a missing shard": ("finetune", "--config {d}/c.yaml model.path={d}/shard_missing",
                                    "lacks, e.g. model-00002-of-00002.safetensors"),
    "shard cut in half": ("finetune", "--config {d}/c.yaml model.path={d}/shard_cut",
                          "{d}/shard_cut/model-00002-of-00002.safetensors is not a readable safetensors file"),
    "config.json not JSON": ("finetune", "--config {d}/c.yaml model.path={d}/config_broken",
                             "{d}/config_broken/config.json is not valid JSON"),
    "config.json not an object": ("finetune", "--config {d}/c.yaml model.path={d}/config_list",
                                  "{d}/config_list/config.json holds a list, not a JSON object"),
    "config.json without model_type": ("finetune", "--config {d}/c.yaml model.path={d}/config_untyped",
                                       "{d}/config_untyped/config.json has no model_type"),
    "GGUF cut in its tensor data": ("finetune", gguf_args("data_cut.gguf"),
                                    "{d}/data_cut.gguf is not a readable GGUF file"),
    "GGUF cut in its header": ("finetune", gguf_args("header_cut.gguf"),
                               "{d}/header_cut.gguf is not a readable GGUF file"),
    "GGUF of garbage": ("finetune", gguf_args("garbage.gguf"), "{d}/garbage.gguf is not a readable GGUF file"),
    "GGUF magic then garbage": ("finetune", gguf_args("magic_garbage.gguf"),
                                "{d}/magic_garbage.gguf is not a readable GGUF file"),
    "GGUF string not UTF-8": ("finetune", gguf_args("bad_string.gguf"),
                              "{d}/bad_string.gguf is not a readable GGUF file (UnicodeDecodeError"),
    "tokenizer files deleted": ("finetune", "--config {d}/c.yaml model.path={d}/no_tokenizer",
                                "no tokenizer could be loaded from model.path {d}/no_tokenizer: "),
    "tokenizer.json not JSON": ("finetune", "--config {d}/c.yaml model.path={d}/tokenizer_broken",
                                "no tokenizer could be loaded from model.path {d}/tokenizer_broken (JSONDecodeError"),
    "vocab.txt of garbage": ("finetune", "--config {d}/c.yaml model.path={d}/vocab_garbage",
                             "no tokenizer could be loaded from model.path {d}/vocab_garbage ("),
    "model.tokenizer missing": ("finetune", "--config {d}/c.yaml model.tokenizer={d}/missing_tokenizer",
                                "model.tokenizer {d}/missing_tokenizer does not exist"),
    "evaluate --step base of a damaged base": ("evaluate", "--checkpoint {d}/run --step base --output {new}/m.json",
                                               "{d}/base/model.safetensors is not a readable safetensors file"),
    "export of a run whose frozen base is damaged": ("export_hf", "--checkpoint {d}/run --output {new}",
                                                     "{d}/base/model.safetensors is not a readable safetensors file"),
}


@pytest.mark.parametrize("name", CASES)
def test_damaged_file_is_one_error_line_and_changes_nothing(name, world, tmp_path, monkeypatch, capsys):
  script, args, message = CASES[name]
  fill = lambda text: text.format(d=world, new=tmp_path / "new")
  argv = fill(args).split()
  if script == "finetune":
    argv += ["--run-dir", str(tmp_path / "new")]
  if script == "evaluate":
    (tmp_path / "new").mkdir()
  before = snapshot(world)
  code, err = run_in_process(script, *argv, monkeypatch=monkeypatch, capsys=capsys)
  assert code == 2, err
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err  # one line, nothing else
  assert fill(message) in err, err
  assert snapshot(world) == before
  if script == "evaluate":
    assert not list((tmp_path / "new").iterdir())
  else:
    assert not (tmp_path / "new").exists()
  assert not list(world.rglob(".lock"))
