"""sweep.py -> two real tiny runs -> compare.py table, CSV and plot."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import run_script, write_config
from PIL import Image

from jaxtune.errors import UserError
from jaxtune.tools import sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_bert_dir, reviews):
  """A 2-variant learning-rate sweep of 2 steps each on the tiny BERT, in real processes."""
  tmp = tmp_path_factory.mktemp("sweep")
  cfg = write_config(tmp / "c.yaml", tiny_bert_dir, reviews)
  out = tmp / "sweep"
  result = run_script("sweep.py", "--config", cfg, "--grid", "optim.lr=[1e-3,5e-4]", "--out", out,
                      "train.max_steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  return cfg, out, result


def test_sweep_runs_each_variant_into_its_own_dir_and_skips_finished(swept):
  cfg, out, result = swept
  runs = sorted(p.name for p in out.iterdir() if p.is_dir())
  assert runs == ["lr=0.0005", "lr=0.001"]
  for name, lr in (("lr=0.001", 1e-3), ("lr=0.0005", 5e-4)):
    summary = json.loads((out / name / "summary.json").read_text())
    assert summary["step"] == 2
    assert f"lr: {lr}" in (out / name / "config.yaml").read_text()
  table = (out / "compare.md").read_text()
  assert "| lr=0.001 | finished | 2 |" in table and "| lr=0.0005 | finished | 2 |" in table
  assert result.stdout.endswith(table)
  again = run_script("sweep.py", "--config", cfg, "--grid", "optim.lr=[1e-3,5e-4]", "--out", out, "train.max_steps=2")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished, skipped") == 2


def test_compare_csv_and_plot(swept, tmp_path):
  _, out, _ = swept
  runs = [out / "lr=0.001", out / "lr=0.0005"]
  result = run_script("compare.py", *runs, "--csv", "--plot", tmp_path / "curves.png")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(csv.DictReader(io.StringIO(result.stdout.split("wrote ")[0])))
  assert [r["run"] for r in rows] == ["lr=0.001", "lr=0.0005"]
  for row, run in zip(rows, runs):
    summary = json.loads((run / "summary.json").read_text())
    assert int(row["trainable_params"]) == summary["trainable_params"]
    assert row["last"].startswith("step 2: accuracy")
  image = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
  assert image.shape == (450, 1200, 3)  # 12 x 4.5 inches at 100 dpi
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # lines, text and legend, not a blank canvas
  assert (image.reshape(-1, 3) != 255).any(axis=1).mean() > 0.02


def test_grid_parsing():
  grid = sweep.parse_grid(["optim.lr=[1e-4, 5e-5]", "train.seed=3"])
  assert grid == [("optim.lr", [1e-4, 5e-5]), ("train.seed", [3])]
  assert sweep.variants(grid) == [{"optim.lr": 1e-4, "train.seed": 3}, {"optim.lr": 5e-5, "train.seed": 3}]
  assert sweep.name_of({"optim.lr": 1e-4, "train.seed": 3}) == "lr=0.0001__seed=3"
  for bad in ("optim.lr", "optim.lr=[]", "=[1]", "optim.lr=[1"):
    with pytest.raises(UserError, match="--grid"):
      sweep.parse_grid([bad])
  with pytest.raises(UserError, match="twice"):
    sweep.parse_grid(["optim.lr=[1]", "optim.lr=[2]"])


def test_compare_refuses_a_non_run_dir(tmp_path):
  result = run_script("compare.py", tmp_path)
  assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and "run directory" in result.stderr
