"""`jaxtune grad-precision` from a checkout (the code and its --help: jaxtune/commands/grad_precision.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("grad-precision")
