"""`jaxtune config-docs` from a checkout (the code and its --help: jaxtune/commands/config_docs.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("config-docs")
