"""The seeds study: its statistics on a hand-worked case, and scripts/seeds.py end to end on a tiny BERT."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_script, write_config

from jaxtune.tools import study


def test_summary_of_a_hand_worked_case():
  tests = {"jaxtune": {0: {"accuracy": 0.80, "macro_f1": 0.7, "loss": 0.5}, 1: {"accuracy": 0.82, "macro_f1": 0.7,
                                                                                  "loss": 0.5},
                       2: {"accuracy": 0.84, "macro_f1": 0.7, "loss": 0.5}},
           "torch": {0: {"accuracy": 0.83, "macro_f1": 0.6, "loss": 0.4}, 1: {"accuracy": 0.83, "macro_f1": 0.6,
                                                                                "loss": 0.4},
                     2: {"accuracy": 0.86, "macro_f1": 0.6, "loss": 0.4}}}
  report = study.summarise("classification", tests)
  acc = report["metrics"]["accuracy"]
  # jaxtune: mean 0.82, deviations -0.02, 0, 0.02 -> variance 0.0008 / 2 -> std 0.02.
  # torch: mean 0.84, deviations -0.01, -0.01, 0.02 -> variance 0.0006 / 2 -> std sqrt(0.0003) = 0.01732.
  assert acc["jaxtune"]["mean"] == pytest.approx(0.82) and acc["jaxtune"]["std"] == pytest.approx(0.02)
  assert acc["torch"]["mean"] == pytest.approx(0.84) and acc["torch"]["std"] == pytest.approx(0.0173205, rel=1e-5)
  assert acc["difference"] == pytest.approx(-0.02)
  h = report["headline"]
  # 2 points apart: outside the half-point bar and outside torch's spread of 1.73 points
  assert h["metric"] == "accuracy" and not h["within_bar"] and not h["within_torch_std"]
  assert h["standard_error"] == pytest.approx(math.sqrt(0.02 ** 2 / 3 + 0.0003 / 3))
  text = study.markdown(report)
  assert "| accuracy | 0.8200 ± 0.0200 (0.8000, 0.8200, 0.8400) | 0.8400 ± 0.0173 (0.8300, 0.8300, 0.8600) |" in text
  assert "-2.00 points" in text and "within 0.5 point: no" in text


@pytest.mark.slow  # ~40 s of subprocesses; the report maths is tested above (python -m pytest -m slow)
def test_seeds_script_with_a_shared_init_and_no_dropout_gives_both_sides_one_result(tmp_path, tiny_bert_dir, reviews):
  """Same initial weights, no dropout: the two trainings may differ only by rounding, so must their scores."""
  cfg = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews)
  args = ["--config", cfg, "--seeds", "3", "--out", tmp_path / "study", "--init", "jaxtune", "model.dropout=0.0"]
  first = run_script("seeds.py", *args)
  assert first.returncode == 0, first.stderr[-3000:]
  report = json.loads((tmp_path / "study" / "report.json").read_text())
  acc, loss = report["metrics"]["accuracy"], report["metrics"]["loss"]
  assert acc["jaxtune"]["seeds"] == acc["torch"]["seeds"] == [3]
  assert acc["jaxtune"]["values"] == acc["torch"]["values"]
  assert loss["jaxtune"]["values"][0] == pytest.approx(loss["torch"]["values"][0], rel=1e-4)
  assert report["headline"]["within_bar"] and (tmp_path / "study" / "report.md").read_text().startswith("| test metric")
  # Rerunning the command finds every result and trains nothing.
  again = run_script("seeds.py", *args)
  assert again.returncode == 0 and "step 4/4" not in again.stdout and "it/s" not in again.stderr
  assert json.loads((tmp_path / "study" / "report.json").read_text()) == report


def test_a_run_that_finished_before_its_scoring_is_only_scored(tmp_path):
  """An interrupted study resumes an unfinished run and does not ask finetune.py to resume a finished one."""
  s = study.Study(tmp_path / "c.yaml", tmp_path / "study", (0,))
  run_dir = tmp_path / "study" / "jaxtune" / "seed0"
  scripts = lambda: [(cmd[3], "--resume" in cmd) for cmd in study.commands(s, "jaxtune", 0)]  # python -m jaxtune X
  assert scripts() == [("finetune", False), ("evaluate", False)]
  run_dir.mkdir(parents=True)
  (run_dir / "config.yaml").write_text("task: classification\n")
  assert scripts() == [("finetune", True), ("evaluate", False)]
  (run_dir / "summary.json").write_text("{}")
  assert scripts() == [("evaluate", False)]


def test_seeds_script_rejects_bad_seeds(tmp_path, tiny_bert_dir, reviews):
  result = run_script("seeds.py", "--config", write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews),
                      "--seeds", "0,one")
  assert result.returncode == 2 and result.stderr.strip() == ("error: --seeds '0,one' is not a comma-separated list "
                                                              "of integers, e.g. 0,1,2.")
