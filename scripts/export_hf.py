"""`jaxtune export` from a checkout (the code and its --help: jaxtune/commands/export_hf.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("export")
