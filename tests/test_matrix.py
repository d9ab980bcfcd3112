"""scripts/benchmark.py suite: the short mixed-length data it generates and how it summarises the alternated runs."""

from __future__ import annotations

import csv

import pytest

from jaxtune.tools import matrix


def test_short_reviews_are_cut_to_4_to_44_words_about_half_each_side_of_22(tmp_path):
  rows = list(csv.DictReader(matrix.write_short_reviews(tmp_path).open()))
  assert len(rows) == 4000 and set(r["score"] for r in rows) == {"great", "other"}
  words = [len(r["review"].split()) for r in rows]
  assert min(words) >= 1 and max(words) <= 44  # a review shorter than its cut keeps all its words
  short = sum(n < 22 for n in words) / len(words)
  assert 0.4 < short < 0.6, short
  assert matrix.write_short_reviews(tmp_path / "again").read_text() == (tmp_path / "train.csv").read_text()


def test_the_summary_takes_medians_per_side_and_the_table_names_the_worst_row():
  loads = matrix.SUITES["cpu"][:2]
  runs = [{"workload": load.name, "side": side, "loop_s": loop, "wall_s": loop + 10, "peak_rss": 2**30}
          for load, times in zip(loads, ({"jaxtune": [10, 12, 30], "pytorch": [15, 14, 13]},
                                         {"jaxtune": [20, 21, 22], "pytorch": [18, 19, 40]}))
          for side, loops in times.items() for loop in loops]
  rows = matrix.summary(runs, loads)
  assert [r["workload"] for r in rows] == ["fixed-32", "fixed-64"]
  assert rows[0]["jaxtune"]["loop_s"] == {"median": 12, "min": 10, "max": 30}
  assert rows[0]["ratio_loop_s"] == pytest.approx(14 / 12) and rows[1]["ratio_loop_s"] == pytest.approx(19 / 21)
  text = matrix.table({"suite": "cpu", "date": "d", "machine": "m", "rounds": 3, "compile_cache": "cold",
                       "summary": rows})
  assert "worst in-loop ratio 0.90x (fixed-64)" in text and "| fixed-32 | 12.0 [10.0-30.0] | 14.0 [13.0-15.0]" in text


def test_an_unknown_workload_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="short-mixed"):
    matrix.measure("cpu", 1, ["short"], tmp_path)


def test_the_per_length_table_compares_later_steps_and_first_steps_per_side():
  load = matrix.SUITES["cpu"][4]  # short-mixed
  records = [{"length": n, "seconds": s} for n, s in ((32, 2.0), (64, 3.0), (32, 1.0), (32, 1.2), (64, 1.5))]
  torch_side = matrix.step_lengths(records)
  assert list(torch_side) == ["32", "64"] and torch_side["32"]["steps"] == 3
  assert torch_side["32"]["rest_mean_s"] == pytest.approx(1.1) and torch_side["64"]["first_s"] == 3.0
  ours = {"32": {"steps": 3, "s": 2.0, "first_s": 1.0, "rest_mean_s": 0.5},
          "64": {"steps": 2, "s": 1.6, "first_s": 0.8, "rest_mean_s": 0.8}}
  runs = [{"workload": load.name, "side": side, "loop_s": 5.0, "wall_s": 9.0, "peak_rss": 2**30, "by_length": b}
          for side, b in (("jaxtune", ours), ("pytorch", torch_side))]
  row = matrix.summary(runs, (load,))[0]
  assert [b["length"] for b in row["by_length"]] == [32, 64]
  assert row["by_length"][0]["ratio_step_s"] == pytest.approx(1.1 / 0.5)
  text = matrix.table({"suite": "cpu", "date": "d", "machine": "m", "rounds": 1, "compile_cache": "cold",
                       "summary": [row]})
  assert "| short-mixed | 64 | 2 | 0.800 [0.800-0.800] | 1.500 [1.500-1.500] | 1.88x | 0.80 [0.80-0.80] |" in text
