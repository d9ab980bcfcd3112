"""The `jaxtune` command: `jaxtune COMMAND [ARGS]`, one subcommand per script of scripts/.

`jaxtune finetune --config minilm_reviews` is `python scripts/finetune.py --config configs/minilm_reviews.yaml`:
each script of a checkout is a one-line wrapper of the module here that `jaxtune` runs, with the same arguments,
output and exit codes (0 done, 2 a bad input, 3 a non-finite step, 75 stopped and resumable, 1 a bug).
`--config NAME` also finds the configs shipped in the package (config.resolve_path).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> its module here (the script of the same name in scripts/)
COMMANDS = {
    "finetune": "finetune", "evaluate": "evaluate", "export": "export_hf", "compare": "compare", "sweep": "sweep",
    "explain": "explain", "benchmark": "benchmark", "plan": "plan", "plan-tables": "plan_tables", "seeds": "seeds",
    "published": "published", "torch-reference": "torch_reference", "text-corpus": "text_corpus",
    "bible-pairs": "bible_pairs", "review-pairs": "review_pairs", "wnut16": "wnut16", "config-docs": "config_docs",
    "grad-precision": "grad_precision",
}


def summary(name: str) -> str:
  """The first line of a subcommand's docstring, without the usage line some give after it."""
  doc = (importlib.import_module(f"jaxtune.commands.{COMMANDS[name]}").__doc__ or "").strip()
  return doc.splitlines()[0].split(": python scripts/")[0].rstrip(",.") if doc else ""


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
  return ("usage: jaxtune COMMAND [ARGS]   (jaxtune COMMAND --help for its arguments)\n\ncommands:\n"
          + "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  """`jaxtune COMMAND [ARGS]`: runs one subcommand (`run`) under the name `jaxtune COMMAND`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    (sys.stdout if argv else sys.stderr).write(usage())
    sys.exit(0 if argv else 2)
  name = argv[0]
  if name not in COMMANDS:
    sys.stderr.write(f"error: jaxtune: unknown command {name!r}; choose one of {', '.join(COMMANDS)} "
                     "(jaxtune --help lists them).\n")
    sys.exit(2)
  sys.argv = [f"jaxtune {name}", *argv[1:]]  # argparse's prog: "error: jaxtune finetune: ...", "usage: jaxtune ..."
  run(name)


def run(name: str) -> None:
  """Runs subcommand `name` on sys.argv as its script does (cli.run: one line and an exit code for any failure)."""
  module = importlib.import_module(f"jaxtune.commands.{COMMANDS[name]}")
  from jaxtune import cli

  if getattr(module, "TPU_COMPILE_ONLY", False):
    cli.compile_only_tpu()  # before jax is imported: libtpu compiles for the slice on this host, quietly
  cli.run(module.main)
