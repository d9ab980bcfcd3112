"""Export for transformers: python scripts/export_hf.py --checkpoint RUN_DIR [--step N|best|latest] --output DIR

LoRA adapters are merged into the weights; with --peft the output is a PEFT adapter directory instead. Beside the
weights goes README.md, a model card in the form the Hugging Face hub shows (base model, task, data, metrics from
the checkpoint and summary.json, the recipe and the config)."""

import json
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="run directory written by scripts/finetune.py")
  parser.add_argument("--step", default="latest", help="best, latest or a saved step number")
  parser.add_argument("--output", required=True, help="new (or empty) directory for the HF model")
  parser.add_argument("--peft", action="store_true", help="write a PEFT LoRA adapter directory (a LoRA run only)")
  args = parser.parse_args()

  from absl import logging

  from jaxtune import config, sharding, storage
  from jaxtune.eval import card
  from jaxtune.train import restore
  from jaxtune.train.checkpoints import Checkpoints
  from jaxtune.weights import export

  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only

  run_dir, out_dir = storage.path(args.checkpoint), Path(args.output)  # the run: a local path, s3:// or gs:// URL
  cli.log_details_to(run_dir)  # third-party log records go to RUN_DIR/details.log
  export.check_free(out_dir)  # before reading the checkpoint, not after
  meta, model, params, step = restore.restore_step(run_dir, args.step, sharding.make_mesh(config.MeshConfig()))
  summary = run_dir / "summary.json"
  text = card.model_card(config.from_dict(config.Config, meta["config"]), step,
                         Checkpoints(run_dir, read_only=True).read_meta(step).get("metrics"),
                         json.loads(summary.read_text()) if summary.exists() else None, run_dir.name, args.peft)
  with storage.local_dir(run_dir / "tokenizer") as tokenizer_dir:
    export.export(model, params, meta["labels"], restore.model_config(meta), tokenizer_dir, out_dir, args.peft, text)
  print(f"wrote {out_dir}")
  return 0
