"""`jaxtune explain` from a checkout (the code and its --help: jaxtune/commands/explain.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("explain")
