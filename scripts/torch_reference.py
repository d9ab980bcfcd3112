"""The same fine-tune in PyTorch transformers, as a yardstick for scripts/finetune.py.

python scripts/torch_reference.py --config configs/minilm_reviews.yaml [--output FILE] [key=value ...]

Same recipe as jaxtune: the config's model, tokenisation, held-out split, batch order and padding
(jaxtune's own data code), AdamW with the same schedule, decay mask and clipping. Only the head
init and the dropout masks differ (torch's RNG). Scores the final step on validation and test.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxtune import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True)
  parser.add_argument("--output", default="runs/torch_reference.json")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args()

  import torch
  import transformers

  from jaxtune import config, metrics, optim, weights
  from jaxtune.data import batching, classification
  from jaxtune.train import total_steps

  cfg = config.load(args.config, args.overrides)
  start = time.perf_counter()
  torch.manual_seed(cfg.train.seed)
  model_dir = weights.resolve_model_dir(cfg.model.path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  names = ["train", "validation", "test"]
  labels, splits = classification.load_splits(cfg.data, cfg.train.seed, tokenizer, names)
  per_epoch, steps = total_steps(cfg, len(splits["train"]))
  model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  o = cfg.optim
  groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  lr_at = optim.schedule(o, steps)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr_at(s)) / o.lr)

  def as_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

  model.train()
  step, losses = 0, []
  while step < steps:
    epoch, offset = divmod(step, per_epoch)
    order = batching.train_batches(splits["train"].lengths, cfg.train.batch_size, cfg.train.seed, epoch,
                                   cfg.data.group_by_length)
    for rows in order[offset:offset + steps - step]:
      batch = batching.collate(splits["train"], rows, cfg.train.batch_size, cfg.data.length_buckets, cfg.data.max_len)
      loss = model(**as_torch(batch)).loss
      loss.backward()
      if o.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
      opt.step()
      sched.step()
      opt.zero_grad()
      losses.append(loss.item())
      step += 1
      if step % cfg.train.log_every == 0:
        print(f"step {step}/{steps} loss {np.mean(losses[-cfg.train.log_every:]):.4f}", flush=True)

  model.eval()
  result = {"train_seconds": time.perf_counter() - start, "steps": steps}
  for name in ("validation", "test"):
    data = splits[name]
    preds, row_losses = [], []
    with torch.no_grad():
      for rows in batching.eval_batches(len(data), cfg.train.eval_batch_size):
        batch = batching.collate(data, rows, cfg.train.eval_batch_size, cfg.data.length_buckets, cfg.data.max_len)
        logits = model(**{k: v for k, v in as_torch(batch).items() if k != "labels"}).logits[:len(rows)]
        preds.append(logits.argmax(-1).numpy())
        row_losses.append(torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.labels[rows]).long(),
                                                            reduction="none").numpy())
    result[name] = metrics.classification(np.concatenate(preds), data.labels, np.concatenate(row_losses), len(labels))
  Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  cli.run(main)
