"""Published results as correctness anchors: a shipped config trained and scored end to end, its figure printed
beside the one the literature reports for the same model and data (scripts/published.py).

Each anchor runs scripts/finetune.py (resumed if its run dir holds an unfinished run, skipped if finished), then
scripts/evaluate.py on the split the figure is quoted for, each in its own process, and reads the metric back.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxtune import cli
from jaxtune import config as config_lib
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Anchor:
  config: Path
  split: str  # the split the figure is quoted for
  metrics: dict[str, float]  # evaluate.py's metric -> the published figure, on the published scale
  scale: float  # evaluate.py's figure x scale = the published scale (SQuAD's fractions -> points)
  tolerance: float  # how far below the published figure a run may land, in the figure's points
  source: str
  overrides: tuple[str, ...] = ()


ANCHORS = {
    # Devlin et al. 2019, BERT, Table 2: BERT-base, SQuAD v1.1 dev, EM 80.8 / F1 88.5. The config follows
    # transformers' QA example recipe (which reports F1 88.62 / EM 81.3 for it).
    "squad_bert_base": Anchor(config_lib.PACKAGED / "squad_bert_base.yaml", "validation",
                              {"f1": 88.5, "exact_match": 80.8}, 100.0, 1.0,
                              "Devlin et al. 2019 (BERT), Table 2: BERT-base on SQuAD v1.1 dev"),
    # Helsinki-NLP/opus-mt-en-ro on WMT16 en-ro (newstest2016): about 28 BLEU, the figure issue 33 quotes.
    "opus_mt_en_ro": Anchor(config_lib.PACKAGED / "opus_mt_en_ro.yaml", "test", {"bleu": 28.0}, 1.0, 1.0,
                            "opus-mt-en-ro fine-tuned on WMT16 en-ro, sacreBLEU on newstest2016 (about 28)",
                            ("generate.predict_with_generate=true",)),
}


def commands(name: str, anchor: Anchor, out: Path, overrides: Sequence[str] = ()) -> list[list[str]]:
  """The processes that train and score one anchor's run in out/<name>."""
  run_dir = out / name
  train = [*cli.command("finetune"), "--config", str(anchor.config), "--run-dir", str(run_dir),
           *anchor.overrides, *overrides]
  if (run_dir / "summary.json").exists():  # finished (finetune.py writes it last): only scored again
    train = []
  elif (run_dir / "config.yaml").exists():  # interrupted: continues
    train.append("--resume")
  score = [*cli.command("evaluate"), "--checkpoint", str(run_dir), "--step", "latest",
           "--split", anchor.split, "--output", str(out / f"{name}.eval.json")]
  return [cmd for cmd in (train, score) if cmd]


def run(names: Sequence[str], out: Path, overrides: Sequence[str] = (), anchors: dict[str, Anchor] | None = None,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains and scores each named anchor; one row per published figure: name, metric, published, measured (None
  where the run failed), reached. Writes out/report.md."""
  anchors = ANCHORS if anchors is None else anchors
  if unknown := [n for n in names if n not in anchors]:
    raise UserError(f"unknown anchors {unknown}; choose from {sorted(anchors)}.")
  for name in names:  # a bad config fails here, before hours of training
    config_lib.load(anchors[name].config, [*anchors[name].overrides, *overrides])
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in names:
    anchor = anchors[name]
    log(f"== {name}: {anchor.source}")
    measured: dict[str, Any] = {}
    for cmd in commands(name, anchor, out, overrides):
      if (code := subprocess.run(cmd).returncode) != 0:
        log(f"{name}: jaxtune {cmd[3]} failed (exit {code}); its output is above")
        break
    else:
      measured = json.loads((out / f"{name}.eval.json").read_text())
    for metric, published in anchor.metrics.items():
      value = measured.get(metric)
      got = None if value is None else float(value) * anchor.scale
      rows.append({"anchor": name, "metric": metric, "split": anchor.split, "published": published,
                   "measured": got, "reached": got is not None and got >= published - anchor.tolerance,
                   "tolerance": anchor.tolerance, "source": anchor.source})
  (out / "report.md").write_text(markdown(rows))
  return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| anchor | split | metric | published | measured | reached (within tolerance below) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    got = "failed" if r["measured"] is None else f"{r['measured']:.2f}"
    lines.append(f"| {r['anchor']} | {r['split']} | {r['metric']} | {r['published']:.2f} | {got} | "
                 f"{'yes' if r['reached'] else 'no'} ({r['tolerance']:g}) |")
  return "\n".join(lines) + "\n\nSources: " + "; ".join(sorted({f"{r['anchor']}: {r['source']}" for r in rows})) + "\n"
