"""`jaxtune review-pairs` from a checkout (the code and its --help: jaxtune/commands/review_pairs.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("review-pairs")
