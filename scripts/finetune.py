"""`jaxtune finetune` from a checkout (the code and its --help: jaxtune/commands/finetune.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("finetune")
