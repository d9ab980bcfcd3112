"""`jaxtune seeds` from a checkout (the code and its --help: jaxtune/commands/seeds.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("seeds")
