"""The same fine-tune in PyTorch transformers, as a yardstick for scripts/finetune.py.

python scripts/torch_reference.py --config FILE [--output FILE] [--init torch|jaxtune] [--max-examples N]
                                  [--dtype float32|float64] [key=value ...]

Same recipe as jaxtune: the config's model, tokenisation, held-out split, batch order and padding (jaxtune's
own data code), trained by transformers' PyTorch class with torch's fused AdamW, HF Trainer's weight-decay groups,
transformers' schedule and torch's gradient clipping (jaxtune/tools/torch_ref.py). Classification and causal LM.
--init torch (the default) gives new params (a classification head) torch's own seeded init; --init jaxtune
starts from jaxtune's initial weights exactly. Dropout masks come from torch's RNG (seeded by train.seed).
Scores the final step on the validation and test splits (--max-examples: the first N test rows) and writes
them, with the per-step training log, as JSON. --dtype float64 trains and scores in float64: the trajectory that
float32 runs, ours or torch's, approximate.
"""

import argparse
import json
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--output", default="runs/torch_reference.json")
  parser.add_argument("--init", choices=("torch", "jaxtune"), default="torch",
                      help="who initialises the new params (model.new_params)")
  parser.add_argument("--max-examples", type=cli.positive_int, help="score only the first N rows of the test split")
  parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                      help="torch dtype of the weights and the whole computation")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args()

  import torch

  from jaxtune import config
  from jaxtune.tools import torch_ref

  cfg = config.load(args.config, args.overrides)

  def log(step: int, steps: int, record: dict) -> None:
    print(f"step {step}/{steps} loss {record['loss']:.4f} grad_norm {record['grad_norm']:.3f} lr {record['lr']:.2e}",
          flush=True)

  result = torch_ref.finetune(cfg, args.init, limit=args.max_examples, log=log, dtype=getattr(torch, args.dtype))
  out = {"config": args.config, "overrides": args.overrides, "seed": cfg.train.seed, "init": args.init,
         "dtype": args.dtype, "train_seconds": result.train_seconds, "steps": len(result.records), **result.metrics,
         "train": result.records}
  Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps({k: v for k, v in out.items() if k != "train"}))
  return 0
