"""The command-line contract: finetune.py -> checkpoint -> evaluate.py in a separate process."""

from __future__ import annotations

import json
import os

import pytest
from conftest import records, run_script, with_devices, write_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bert_dir, reviews):
  """A 4-step run on the tiny BERT and real reviews: validation evals (and checkpoints) at steps 2 and 4."""
  tmp = tmp_path_factory.mktemp("cli")
  cfg = write_config(tmp / "c.yaml", tiny_bert_dir, reviews)
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp / "run", "--quiet", "train.max_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  # --quiet: no progress bar, but each evaluation's line and the final report
  assert "it/s" not in result.stderr + result.stdout and "%|" not in result.stderr
  assert "step 2 validation: accuracy" in result.stdout and "where the time went" in result.stdout
  return tmp / "run"


def in_training_eval(run_dir, step):
  (record,) = [r for r in records(run_dir) if r.get("split") == "validation" and r["step"] == step]
  return record


@pytest.mark.parametrize("step", ["2", pytest.param("latest", marks=pytest.mark.slow)])
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
  env = {**os.environ, "XLA_FLAGS": with_devices(8)}
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp_path / "r", env=env)
  assert result.returncode == 2
  assert "train.batch_size=12 is not divisible by the 8 batch shards" in result.stderr
  assert not (tmp_path / "r").exists()


def test_run_ends_with_a_summary(trained_run):
  """summary.json: versions, devices, mesh, commit, seed, time by phase, throughput, params, best and last eval."""
  summary = json.loads((trained_run / "summary.json").read_text())
  evals = [r for r in records(trained_run) if r.get("split") == "validation"]
  assert summary["status"] == "finished" and summary["step"] == summary["total_steps"] == 4
  assert summary["last_eval"] == evals[-1]
  assert summary["best_eval"] == max(evals, key=lambda r: r["accuracy"])  # checkpoint.best_metric's default
  assert summary["versions"]["jax"] and summary["versions"]["flax"] and summary["versions"]["optax"]
  assert summary["devices"]["count"] >= 1 and summary["mesh"] and summary["seed"] == 0
  assert summary["trainable_params"] == summary["total_params"] > 0 and summary["lora"] is None
  assert summary["timing"]["train_s"] > 0 and summary["timing"]["tokens_per_s"] > 0
  assert summary["git_commit"] is None or len(summary["git_commit"].split("+")[0]) == 40


def test_tensorboard_events_hold_the_logged_values(trained_run):
  """TensorBoard's own reader finds every train and validation scalar of metrics.jsonl in the run dir."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(trained_run))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "validation/accuracy",
          "validation/loss"} <= tags
  logged = records(trained_run)
  train = {r["step"]: r for r in logged if "grad_norm" in r}
  evals = {r["step"]: r for r in logged if r.get("split") == "validation"}
  assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
  for tag, rows, key in [("train/loss", train, "loss"), ("train/grad_norm", train, "grad_norm"),
                         ("train/lr", train, "lr"), ("validation/accuracy", evals, "accuracy"),
                         ("validation/loss", evals, "loss")]:
    got = {e.step: e.value for e in events.Scalars(tag)}
    assert sorted(got) == sorted(rows), tag
    for step, row in rows.items():
      assert got[step] == pytest.approx(row[key], rel=1e-6, abs=1e-12), (tag, step)


@pytest.mark.slow  # explain.py's API is tested in test_explain.py
def test_explain_prints_attributions_and_writes_html(trained_run, tmp_path):
  out = tmp_path / "why.html"
  result = run_script("explain.py", "--checkpoint", trained_run, "--text", "great coffee, would buy again",
                      "--steps", "16", "--html", out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("explained: ") == 1
  page = out.read_text()
  assert page.count("<h3>") == 1 and "coffee" in page and "rgba(" in page
