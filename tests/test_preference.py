"""task: preference (DPO) end to end on a tiny random Llama with SmolLM2's tokenizer: the reference precomputed and
cached or (LoRA) the adapters switched off, TRL's metrics in metrics.jsonl and from evaluate.py, the step on 8 devices,
the memory of LoRA-DPO beside LoRA-SFT, and bad preference data. The loss itself is held to TRL's in
tests/test_preference_parity.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, records, run_in_process, with_devices

from jaxtune import config as config_lib
from jaxtune.errors import UserError
from jaxtune.tasks import TASKS
from jaxtune.weights import pretrained

LORA = {"targets": ["layers.attn.(q|v).kernel", "layers.mlp.(gate|up|down).kernel"], "rank": 4, "alpha": 8}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, reviews):
  """Review pairs as JSONL: the true label chosen, the wrong one rejected (48 train, 16 test)."""
  d = tmp_path_factory.mktemp("pairs")
  df = pd.read_csv(reviews["train"]).head(64)
  rows = [{"prompt": f"Review: {r.review[:100]}\nGreat or other?\n", "chosen": r.score,
           "rejected": "other" if r.score == "great" else "great"} for r in df.itertuples()]
  for name, part in (("train", rows[:48]), ("test", rows[48:])):
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
  return {"train": d / "train.jsonl", "test": d / "test.jsonl"}


def dpo_config(path, model_dir, pairs, **sections):
  cfg = {"task": "preference", "model": {"path": str(model_dir), "new_params": [], "dropout": 0.0},
         "data": {"train": str(pairs["train"]), "test": str(pairs["test"]), "validation_holdout": 8,
                  "prompt_column": "prompt", "max_len": 48, "length_buckets": [32, 48]},
         "optim": {"lr": 1e-3, "warmup_steps": 0},
         "train": {"batch_size": 4, "eval_batch_size": 4, "max_steps": 4, "eval_every": 2, "log_every": 1},
         "generate": {"exact_match": True, "max_new_tokens": 3}}
  for section, values in sections.items():
    cfg.setdefault(section, {}).update(values)
  path.write_text(yaml.safe_dump(cfg))
  return path


def train(tmp_path, name, model_dir, pairs, monkeypatch, capsys, *overrides, **sections):
  cfg = dpo_config(tmp_path / f"{name}.yaml", model_dir, pairs, **sections)
  code, err = run_in_process("finetune", "--config", cfg, "--run-dir", tmp_path / name, *overrides,
                             monkeypatch=monkeypatch, capsys=capsys)
  assert code == 0, err[-3000:]
  return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, pairs):
  """Full DPO (reference precomputed), LoRA-DPO with the reference precomputed and with the adapters off."""
  mp, out = pytest.MonkeyPatch(), {}
  tmp = tmp_path_factory.mktemp("dpo_runs")

  class Capture:  # run_in_process wants capsys's readouterr
    def readouterr(self):
      return type("R", (), {"err": "", "out": ""})()

  try:
    out["full"] = train(tmp, "full", tiny_llama_dir, pairs, mp, Capture())
    for ref in ("precomputed", "adapters_off"):
      out[f"lora_{ref}"] = train(tmp, f"lora_{ref}", tiny_llama_dir, pairs, mp, Capture(),
                                 model={"lora": LORA}, preference={"reference": ref})
  finally:
    mp.undo()
  return out


def train_records(run_dir):
  return [r for r in records(run_dir) if "loss" in r and "split" not in r]


def test_a_run_logs_trl_s_metrics_and_starts_at_log_2(runs):
  for name, run_dir in runs.items():
    steps = train_records(run_dir)
    assert len(steps) == 4, name
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference: margins 0
    assert first["rewards/chosen"] == first["rewards/margins"] == 0.0
    assert all(set(METRICS) <= set(s) for s in steps), name
    assert any(abs(s["rewards/margins"]) > 0 for s in steps[1:]), name  # the policy moved away from the reference
    evals = [r for r in records(run_dir) if r.get("split") == "validation"]
    assert [e["step"] for e in evals] == [2, 4] and set(METRICS) <= set(evals[0]), name
  assert (runs["full"] / "reference_logps.npz").is_file() and not (runs["lora_adapters_off"] /
                                                                  "reference_logps.npz").exists()


def test_adapters_off_is_the_precomputed_reference_without_a_second_pass_over_the_data(runs):
  """With LoRA the starting weights are the base with its adapters' B at zero: the two references are one function,
  so the runs agree step for step (to float32 rounding of the same sums in another order)."""
  pre, live = train_records(runs["lora_precomputed"]), train_records(runs["lora_adapters_off"])
  for a, b in zip(pre, live, strict=True):
    for key in ("loss", "grad_norm", *METRICS):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_evaluate_reports_the_metrics_on_a_split(runs, monkeypatch, capsys):
  for name in ("full", "lora_adapters_off"):
    out = runs[name] / f"eval_{name}.json"
    code, err = run_in_process("evaluate", "--checkpoint", runs[name], "--split", "validation", "--output", out,
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    got = json.loads(out.read_text())
    final = [r for r in records(runs[name]) if r.get("split") == "validation"][-1]
    for key in ("loss", *METRICS, "preference_accuracy"):  # evaluate.py's reference: from model.path, or live
      assert got[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), (name, key)
    assert 0 <= got["exact_match"] <= 1 and got["num_examples"] == 8  # greedy answers against the chosen ones


def test_a_resumed_run_reads_the_cached_reference(tmp_path, runs, tiny_llama_dir, pairs, monkeypatch, capsys):
  cached = np.load(runs["full"] / "reference_logps.npz")
  assert set(cached) == {"train", "validation"} and np.isfinite(cached["train"]).all()
  assert len(cached["train"]) == 2 * 40  # a chosen and a rejected row per pair
  run_dir = tmp_path / "resumed"
  cfg = dpo_config(tmp_path / "r.yaml", tiny_llama_dir, pairs, train={"max_steps": 2})
  for args in ((), ("--resume", "--extend", "train.max_steps=3")):
    code, err = run_in_process("finetune", "--config", cfg, "--run-dir", run_dir, *args, monkeypatch=monkeypatch,
                               capsys=capsys)
    assert code == 0, err[-3000:]
  assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3]
  mine = np.load(run_dir / "reference_logps.npz")
  np.testing.assert_array_equal(mine["train"], cached["train"])  # the same starting weights and rows
  (run_dir / "reference_logps.npz").unlink()
  code, err = run_in_process("finetune", "--config", cfg, "--run-dir", run_dir, "--resume", "--extend",
                             "train.max_steps=4", monkeypatch=monkeypatch, capsys=capsys)
  assert code != 0 and "reference_logps.npz is missing" in err


def _step_memory(run_dir):
  return next(r for r in records(run_dir) if r.get("event") == "start")["step_memory_bytes"]["total"]


def test_lora_dpo_with_the_adapters_off_needs_about_the_memory_of_lora_sft(tmp_path, runs, tiny_llama_dir, pairs,
                                                                           monkeypatch, capsys):
  """The same sequences per step (4 pairs = 8 rows beside 8 SFT rows): no second model, only one more forward pass,
  whose activations are not kept for a backward pass. XLA's compiled memory of the two steps (the fit check's)."""
  sft = dpo_config(tmp_path / "sft.yaml", tiny_llama_dir, pairs, model={"lora": LORA},
                   train={"batch_size": 8, "max_steps": 1, "eval_every": 0})
  cfg = yaml.safe_load(sft.read_text())
  cfg["task"] = "causal_lm"
  cfg["data"]["response_column"] = "chosen"
  sft.write_text(yaml.safe_dump(cfg))
  code, err = run_in_process("finetune", "--config", sft, "--run-dir", tmp_path / "sft", monkeypatch=monkeypatch,
                             capsys=capsys)
  assert code == 0, err[-3000:]
  dpo, sft_bytes = _step_memory(runs["lora_adapters_off"]), _step_memory(tmp_path / "sft")
  assert dpo <= 1.10 * sft_bytes, (dpo, sft_bytes)


@pytest.mark.parametrize("rows, problem", [
    ([{"prompt": "p", "chosen": "a"}], "no column 'rejected'"),
    ([{"prompt": "p", "chosen": "a", "rejected": " "}], r"bad.jsonl\) line 1, row 0 has an empty or non-text rejected"),
    ([{"prompt": "long " * 80, "chosen": "a", "rejected": "b"}],
     r"its prompt is \d+ tokens, which leaves its responses"),
])
def test_bad_preference_rows_get_one_error_naming_the_row(tmp_path, tiny_llama_dir, rows, problem):
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config_lib.load(dpo_config(tmp_path / "c.yaml", tiny_llama_dir, {"train": path, "test": path},
                                   data={"validation_holdout": 0}))
  with pytest.raises(UserError, match=problem):
    TASKS["preference"].load(cfg, pretrained.load_tokenizer(cfg.model), ["train"])


@pytest.mark.parametrize("override, problem", [
    ("preference.reference=adapters_off", "adapters_off needs LoRA adapters"),
    ("data.prompt_column=null", "must give the prompt for task preference"),
    ("preference.label_smoothing=0.5", "must be below 0.5"),
])
def test_bad_preference_configs_are_refused(tmp_path, tiny_llama_dir, pairs, override, problem):
  with pytest.raises(UserError, match=problem):
    config_lib.load(dpo_config(tmp_path / "c.yaml", tiny_llama_dir, pairs), [override])


def test_the_step_on_eight_devices_with_fsdp_equals_one_device(tmp_path, runs, tiny_llama_dir, pairs):
  """LoRA-DPO with the adapters-off reference, fsdp 4 x tensor 2 on 8 simulated devices, against the 1-device run."""
  cfg = dpo_config(tmp_path / "c.yaml", tiny_llama_dir, pairs, model={"lora": LORA},
                   preference={"reference": "adapters_off"}, mesh={"data": 1, "fsdp": 4, "tensor": 2})
  env = {**os.environ, "XLA_FLAGS": with_devices(8), "JAX_PLATFORMS": "cpu",
         "JAXTUNE_NO_HOST_TUNING": "1"}
  done = subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(cfg), "--run-dir",
                         str(tmp_path / "eight")], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  eight, one = train_records(tmp_path / "eight"), train_records(runs["lora_adapters_off"])
  assert next(r for r in records(tmp_path / "eight") if r.get("event") == "start")["mesh"]["fsdp"] == 4
  for a, b in zip(eight, one, strict=True):
    for key in ("loss", "grad_norm", *METRICS):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
