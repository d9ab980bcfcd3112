"""`jaxtune evaluate` from a checkout (the code and its --help: jaxtune/commands/evaluate.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("evaluate")
