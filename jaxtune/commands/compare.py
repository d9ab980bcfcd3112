"""Runs side by side: python scripts/compare.py RUN_DIR... [--csv] [--plot FILE.png]

Prints one row per run (status, step, trainable params, best and last validation metrics, tokens/s, MFU,
time, peak memory; from summary.json, or from metrics.jsonl for a run still going) as a markdown table,
or CSV with --csv. --plot draws every run's train loss and validation metrics against step in one PNG.
"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by finetune.py")
  parser.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
  parser.add_argument("--plot", metavar="FILE.png", help="also draw the runs' curves into this PNG")
  args = parser.parse_args()

  from jaxtune.tools import compare

  rows = [compare.read_run(Path(r)) for r in args.runs]
  print(compare.to_csv(rows) if args.csv else compare.markdown(rows), end="")
  if args.plot:
    compare.plot(rows, Path(args.plot))
    print(f"wrote {args.plot}")
  return 0
