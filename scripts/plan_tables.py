"""`jaxtune plan-tables` from a checkout (the code and its --help: jaxtune/commands/plan_tables.py)."""

from jaxtune.commands import run

if __name__ == "__main__":
  run("plan-tables")
