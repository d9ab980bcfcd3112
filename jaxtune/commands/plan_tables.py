"""The planner's tables for Llama-3.1-8B and -70B (full, LoRA on a bfloat16 base, QLoRA on NF4) on 1 and 8 H200s,
a v5e-8 and a v5p-64, at torchtune's published workload; and the longest QLoRA row that fits one GPU, as Unsloth
publishes it. docs/large_models.md holds the output.

python scripts/plan_tables.py [--models Llama-3.1-8B,Llama-3.1-70B] [--methods full,LoRA bf16,QLoRA NF4]
                              [--targets 1 x H200,8 x H200,v5e-8,v5p-64] [--json PATH]

TPU cells compile the real train step for the slice on this host (needs jaxtune[tpu-compile]); GPU cells are the
analytic estimate.
"""

import argparse
import json
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="Llama-3.1-8B,Llama-3.1-70B")
  parser.add_argument("--methods", default="full,LoRA bf16,QLoRA NF4")
  parser.add_argument("--targets", default="1 x H200,8 x H200,v5e-8,v5p-64")
  parser.add_argument("--json", help="also write every plan as JSON to this path")
  args = parser.parse_args()

  from jaxtune.errors import UserError
  from jaxtune.tools import plan_tables

  chosen = {}
  for flag, known in (("models", plan_tables.MODELS), ("methods", plan_tables.METHODS),
                      ("targets", plan_tables.TARGETS)):
    chosen[flag] = getattr(args, flag).split(",")
    unknown = [x for x in chosen[flag] if x not in known]
    if unknown:
      raise UserError(f"--{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}.")
  cells = plan_tables.run(chosen["models"], chosen["methods"], chosen["targets"])
  print()
  print(plan_tables.markdown(cells))
  print("The longest single QLoRA row (rank 32, batch 1) the estimate fits, in tokens:")
  for model in chosen["models"]:
    for gib in (48, 80):
      tokens = plan_tables.max_context(model, "QLoRA NF4", gib * 1e9 / 2**30)
      print(f"  {model} on {gib} GB: {tokens:,}")
  if args.json:
    Path(args.json).write_text(json.dumps([c.__dict__ for c in cells], indent=2, default=str) + "\n")
  return 0


TPU_COMPILE_ONLY = True  # `jaxtune` sets cli.compile_only_tpu() before jax is imported, as the script does
