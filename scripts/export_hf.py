"""Export for transformers: python scripts/export_hf.py --checkpoint RUN_DIR [--step N|best|latest] --output DIR

LoRA adapters are merged into the weights; with --peft the output is a PEFT adapter directory instead."""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="run directory written by scripts/finetune.py")
  parser.add_argument("--step", default="latest", help="best, latest or a saved step number")
  parser.add_argument("--output", required=True, help="new (or empty) directory for the HF model")
  parser.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter directory (a LoRA run only)")
  args = parser.parse_args()

  from absl import logging

  from jaxtune import export

  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only

  out_dir = export.export(Path(args.checkpoint), args.step, Path(args.output), args.peft)
  print(f"wrote {out_dir}")
  return 0


if __name__ == "__main__":
  cli.run(main)
