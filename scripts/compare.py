"""`jaxtune compare` from a checkout (the code and its --help: jaxtune/commands/compare.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("compare")
