"""`jaxtune sweep` from a checkout (the code and its --help: jaxtune/commands/sweep.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("sweep")
