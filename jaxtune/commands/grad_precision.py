"""Float32 against float64: python scripts/grad_precision.py --config FILE [--run RUN_DIR] [--batches 0,44]

For causal-LM runs: the loss and whole gradient of jaxtune and of float32 PyTorch on the config's training
batches (by step index), each against float64 PyTorch on the same weights (a run's latest params, or the
pretrained ones without --run); with --run also its test loss by jaxtune's scorer and the reference's. Prints
JSON. It is how docs/fidelity.md tells rounding apart from a bias in the SmolLM2 seeds study."""

import argparse
import json

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the run's YAML config (or a shipped config's name)")
  parser.add_argument("--run", help="a run directory whose latest params to use (default: the pretrained weights)")
  parser.add_argument("--batches", default="0", help="comma-separated train step indices whose batches to use")
  parser.add_argument("--max-examples", type=cli.positive_int, default=200, help="test rows scored with --run")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.seed=1")
  args = parser.parse_args()

  from jaxtune import config
  from jaxtune.errors import UserError
  from jaxtune.tools import precision

  try:
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    raise UserError(f"--batches {args.batches!r} is not a comma-separated list of step indices, e.g. 0,44.") from None
  cfg = config.load(args.config, args.overrides)
  if cfg.task != "causal_lm":
    raise UserError(f"grad-precision compares causal-LM runs; {args.config} has task {cfg.task}.")
  print(json.dumps(precision.measure(cfg, args.run, batches, args.max_examples), indent=2))
  return 0
