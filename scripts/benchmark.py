"""`jaxtune benchmark` from a checkout (the code and its --help: jaxtune/commands/benchmark.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("benchmark")
