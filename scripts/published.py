"""`jaxtune published` from a checkout (the code and its --help: jaxtune/commands/published.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("published")
