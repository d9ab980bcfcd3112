"""`jaxtune torch-reference` from a checkout (the code and its --help: jaxtune/commands/torch_reference.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("torch-reference")
