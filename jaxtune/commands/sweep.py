"""Grid sweep: python scripts/sweep.py --config FILE --grid 'optim.lr=[1e-4,5e-5]' [--grid ...] [--out DIR] [k=v ...]

Runs scripts/finetune.py for every combination of the grid's values, one after another, each into its own
run dir under DIR (default runs/sweeps/<config name>), named after its values (lr=0.0001__seed=1). A variant
that finished (summary.json) is skipped and an interrupted one resumed, so rerunning the command continues.
Ends with the compare table of all variants (scripts/compare.py), also written to DIR/compare.md.
"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="YAML config (see configs/)")
  parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V,...]",
                      help="a config key and its values; repeat for more keys (their product is swept)")
  parser.add_argument("--out", help="sweep directory (default runs/sweeps/<config name>)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every variant")
  args = parser.parse_args()

  from jaxtune.errors import UserError
  from jaxtune.tools import sweep

  if not args.grid:
    raise UserError("give at least one --grid section.key=[value, ...].")
  out = Path(args.out or Path("runs") / "sweeps" / Path(args.config).stem)
  print(sweep.run(Path(args.config), sweep.parse_grid(args.grid), out, args.overrides), end="")
  return 0
