"""Fine-tune a pretrained HF model.

python scripts/finetune.py --config FILE [--run-dir DIR] [--resume [--extend]] [--quiet] [section.key=value ...]
"""

import time
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--config", required=True, help="YAML config (see configs/)")
  parser.add_argument("--run-dir", help="where checkpoints and logs go (default runs/<config name>)")
  parser.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
  parser.add_argument("--extend", action="store_true",
                      help="with --resume: accept a larger train.max_steps or train.epochs; the learning-rate "
                           "schedule is rebuilt for the new total")
  parser.add_argument("--quiet", action="store_true",
                      help="no progress bar (batch jobs): one line per evaluation and the final report")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-5")
  args = parser.parse_args()
  started = time.perf_counter()

  import jax

  from jaxtune import config, distributed
  from jaxtune.train import loop, perf

  clock = perf.RunClock(started)
  with clock.phase("imports"):  # with jax.distributed's start-up on a cluster
    distributed.initialize()
  cfg = config.load(args.config, args.overrides)
  run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)  # a local path, s3:// or gs:// URL
  if args.extend and not args.resume:
    parser.error("--extend only applies with --resume")
  result = loop.fit(cfg, run_dir, resume=args.resume, clock=clock, extend=args.extend, quiet=args.quiet)
  if jax.process_index() == 0:
    print(f"finished: {run_dir} {result}")
  return 0
