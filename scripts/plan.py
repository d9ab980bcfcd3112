"""`jaxtune plan` from a checkout (the code and its --help: jaxtune/commands/plan.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("plan")
