"""`jaxtune wnut16` from a checkout (the code and its --help: jaxtune/commands/wnut16.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("wnut16")
