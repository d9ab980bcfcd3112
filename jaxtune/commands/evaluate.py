"""Score a checkpoint: python scripts/evaluate.py --checkpoint RUN_DIR [--step best|latest|N|base]
[--split NAME | --data FILE] [--max-examples N] [--output FILE]

Writes the metrics to --output (default RUN_DIR/eval/<split>-<step>.json); for question answering also
the answers, example id -> text, and for seq2seq the generated targets (source, reference, prediction per
row) to <output without .json>.predictions.json."""

import json
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="run directory written by scripts/finetune.py")
  parser.add_argument("--step", default="latest",
                      help="best, latest, a saved step number, or base (the pretrained model)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--split", help="train, validation or test, as configured for the run (default test)")
  source.add_argument("--data", help="a data file, directory or glob with the run's columns")
  parser.add_argument("--max-examples", type=cli.positive_int, help="score only the first N rows of the split")
  parser.add_argument("--output", help="metrics JSON path (default RUN_DIR/eval/<split>-<step>.json)")
  args = parser.parse_args()

  from absl import logging

  from jaxtune import distributed, errors, storage
  from jaxtune.eval import evaluate

  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only

  distributed.initialize()
  run_dir = storage.path(args.checkpoint)  # a local path, s3:// or gs:// URL
  cli.log_details_to(run_dir)  # third-party log records go to RUN_DIR/details.log
  split = args.split or (None if args.data else "test")
  output = storage.path(args.output) if args.output else None
  if output is not None and not storage.is_remote(output) and not output.parent.is_dir():  # found out before
    raise errors.UserError(f"--output {args.output}: directory {output.parent} does not exist; create it "
                           "or choose another path.")
  result = evaluate.evaluate_checkpoint(run_dir, args.step, split, args.data, args.max_examples)
  predictions = result.pop("predictions", None)  # QA answers by example id, seq2seq generations
  print(json.dumps(result), flush=True)  # before writing: a failed write loses nothing
  output = output or run_dir / "eval" / f"{Path(str(result['split'])).stem}-{result['step']}.json"
  evaluate.write_json(result, output)
  print(f"wrote {output}")
  if predictions is not None:
    evaluate.write_json(predictions, output.with_name(output.stem + ".predictions.json"))
    print(f"wrote {output.with_name(output.stem + '.predictions.json')}")
  return 0
