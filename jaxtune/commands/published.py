"""Train shipped configs and print each measured figure beside the published one (correctness anchors).

python scripts/published.py [--only NAME[,NAME]] [--out DIR] [--dry-run] [key=value ...]

Anchors (jaxtune/tools/published.py): squad_bert_base (BERT-base on SQuAD v1.1 dev: F1 88.5, EM 80.8) and
opus_mt_en_ro (opus-mt-en-ro on WMT16 en-ro newstest2016: about 28 BLEU). Both need the Hugging Face hub for
weights and data. Each run lives in DIR/<name> (default runs/published); an interrupted run resumes and a
finished one is only scored again. Ends with a table (also DIR/report.md): published, measured, and whether the
measured figure is within the tolerance below the published one. --dry-run prints the commands instead.
"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", help="comma-separated anchor names (default: all)")
  parser.add_argument("--out", default="runs/published", help="where the runs and the report go")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
  args = parser.parse_args()

  from jaxtune.tools import published

  names = args.only.split(",") if args.only else list(published.ANCHORS)
  out = Path(args.out)
  if args.dry_run:
    for name in names:
      if name not in published.ANCHORS:
        parser.error(f"unknown anchor {name!r}; choose from {sorted(published.ANCHORS)}")
      for cmd in published.commands(name, published.ANCHORS[name], out, args.overrides):
        print(" ".join(cmd))
    return 0
  rows = published.run(names, out, args.overrides)
  print(published.markdown(rows), end="")
  return 0
