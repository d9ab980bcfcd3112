"""Train one recipe with jaxtune and with the PyTorch reference for several seeds; report each side's test metrics.

python scripts/seeds.py --config FILE [--seeds 0,1,2] [--out DIR] [--step latest] [--max-examples N]
                        [--init torch|jaxtune] [--sides jaxtune,torch] [key=value ...]

For each seed (train.seed: new-param init, dropout masks, data order and held-out rows), jaxtune runs
scripts/finetune.py then scripts/evaluate.py --split test, and the reference runs scripts/torch_reference.py,
each in its own process. Results land in DIR (default runs/seeds/<config name>); finished runs are kept, so
rerunning the same command resumes. Ends with DIR/report.md: mean +/- standard deviation of each test metric
per side, the difference of the means, and whether it is within 0.5 point and within PyTorch's seed spread.
"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="YAML config (see configs/)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
  parser.add_argument("--out", help="study directory (default runs/seeds/<config name>)")
  parser.add_argument("--step", default="latest", help="jaxtune checkpoint to score (the reference's is its last)")
  parser.add_argument("--max-examples", type=cli.positive_int, help="score only the first N test rows")
  parser.add_argument("--init", choices=("torch", "jaxtune"), default="torch",
                      help="who initialises the reference's new params (model.new_params)")
  parser.add_argument("--sides", default="jaxtune,torch", help="which of jaxtune,torch to run")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for both sides")
  args = parser.parse_args()

  from jaxtune.errors import UserError
  from jaxtune.tools import study

  try:
    seeds = tuple(int(s) for s in args.seeds.split(","))
  except ValueError:
    raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2.") from None
  out = Path(args.out or Path("runs") / "seeds" / Path(args.config).stem)
  report = study.run(study.Study(Path(args.config), out, seeds, tuple(args.overrides), args.step, args.max_examples,
                                 args.init, tuple(args.sides.split(","))))
  print(study.markdown(report))
  print(f"wrote {out / 'report.md'}")
  return 0
