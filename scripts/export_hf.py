"""Export for transformers: python scripts/export_hf.py --checkpoint RUN_DIR [--step best|latest|N] --output DIR"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="run directory written by scripts/finetune.py")
  parser.add_argument("--step", default="latest", help="best, latest or a saved step number")
  parser.add_argument("--output", required=True, help="new (or empty) directory for the HF model")
  args = parser.parse_args()

  from absl import logging

  from jaxtune import export

  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only

  out_dir = export.export(Path(args.checkpoint), args.step, Path(args.output))
  print(f"wrote {out_dir}")
  return 0


if __name__ == "__main__":
  cli.run(main)
