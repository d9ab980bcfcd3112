"""`jaxtune text-corpus` from a checkout (the code and its --help: jaxtune/commands/text_corpus.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("text-corpus")
