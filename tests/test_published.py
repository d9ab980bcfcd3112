"""scripts/published.py's runner on a tiny anchor: it trains, scores, reads the figure back beside the published
one, and a second call would only score the finished run again."""

from __future__ import annotations

import json

from conftest import write_config

from jaxtune.tools import published


def test_an_anchor_trains_scores_and_reports(tmp_path, tiny_bert_dir, reviews, capsys):
  cfg = write_config(tmp_path / "c.yaml", tiny_bert_dir, reviews, train={"max_steps": 1, "eval_every": 0})
  anchors = {"tiny": published.Anchor(cfg, "test", {"accuracy": 0.0, "macro_f1": 150.0}, 100.0, 1.0, "none")}
  rows = published.run(["tiny"], tmp_path / "out", anchors=anchors)
  scored = json.loads((tmp_path / "out" / "tiny.eval.json").read_text())
  assert [(r["metric"], r["measured"], r["reached"]) for r in rows] == [
      ("accuracy", scored["accuracy"] * 100, True), ("macro_f1", scored["macro_f1"] * 100, False)]
  assert "| tiny | test | macro_f1 | 150.00 |" in (tmp_path / "out" / "report.md").read_text()
  # Again: the finished run is not trained again, only scored.
  assert [cmd[1:4] for cmd in published.commands("tiny", anchors["tiny"], tmp_path / "out")] == [
      ["-m", "jaxtune", "evaluate"]]
