"""The command-line contract: finetune.py -> checkpoint -> evaluate.py in a separate process."""

from __future__ import annotations

import json
import os

import pytest
from conftest import records, run_script, write_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bert_dir, reviews):
  """A 4-step run on the tiny BERT and real reviews: validation evals (and checkpoints) at steps 2 and 4."""
  tmp = tmp_path_factory.mktemp("cli")
  cfg = write_config(tmp / "c.yaml", tiny_bert_dir, reviews)
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp / "run", "train.max_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "run"


def in_training_eval(run_dir, step):
  (record,) = [r for r in records(run_dir) if r.get("split") == "validation" and r["step"] == step]
  return record


@pytest.mark.parametrize("step", ["2", "latest"])
def test_evaluate_reproduces_the_in_training_metric(trained_run, tmp_path, step):
  out = tmp_path / "m.json"
  result = run_script("evaluate.py", "--checkpoint", trained_run, "--step", step, "--split", "validation",
                      "--output", out)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(out.read_text())
  want = in_training_eval(trained_run, got["step"])
  assert got["step"] == (2 if step == "2" else 4)
  assert got["num_examples"] == want["num_examples"] == 16
  assert got["accuracy"] == want["accuracy"] and got["macro_f1"] == want["macro_f1"]
  assert abs(got["loss"] - want["loss"]) < 1e-6


def test_evaluate_test_split_best_step_and_data_file(trained_run, reviews):
  result = run_script("evaluate.py", "--checkpoint", trained_run, "--step", "best")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.splitlines()[0])
  assert {"accuracy", "macro_f1", "loss", "num_examples", "step"} <= set(metrics)
  assert metrics["num_examples"] == 40 and metrics["split"] == "test"
  best = max((in_training_eval(trained_run, s)["accuracy"], -s) for s in (2, 4))
  assert metrics["step"] == -best[1]
  assert (trained_run / "eval" / f"test-{metrics['step']}.json").is_file()
  from_file = run_script("evaluate.py", "--checkpoint", trained_run, "--step", str(metrics["step"]),
                         "--data", reviews["test"])
  assert json.loads(from_file.stdout.splitlines()[0])["accuracy"] == metrics["accuracy"]


def test_a_user_error_is_one_line_and_exit_code_2_from_a_real_process(tmp_path):
  """The process-level contract; tests/test_bad_inputs.py runs the catalogue of bad inputs in-process."""
  result = run_script("finetune.py", "--config", "configs/minilm_reviews.yaml", "optim.lrate=1", "--run-dir",
                      tmp_path / "r")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "no key 'lrate'" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "r").exists()


def test_evaluate_user_errors(tmp_path, trained_run):
  result = run_script("evaluate.py", "--checkpoint", tmp_path)
  assert result.returncode == 2 and "has no checkpoints/ directory" in result.stderr
  result = run_script("evaluate.py", "--checkpoint", trained_run, "--step", "99")
  assert result.returncode == 2 and "is not best, latest or a saved step ([2, 4])" in result.stderr


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path, tiny_bert_dir, reviews):
  cfg = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"batch_size": 12})
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp_path / "r", env=env)
  assert result.returncode == 2
  assert "train.batch_size=12 is not divisible by the 8 batch shards" in result.stderr
  assert not (tmp_path / "r").exists()
