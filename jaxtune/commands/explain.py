"""Why a classifier predicted what it did: per-token integrated-gradient attributions, printed and as HTML.

python scripts/explain.py --checkpoint RUN_DIR [--step best|latest|N] (--text "..." [--text ...] | --data FILE
                          [--max-examples N]) [--target LABEL] [--steps 50] [--baseline pad|zeros] [--html FILE]

Attributions are integrated gradients on the input token embeddings (jaxtune/eval/explain.py) for the predicted
class, or --target: positive tokens push towards it. The baseline keeps [CLS]/[SEP] and puts [PAD]'s
embedding (or zeros) everywhere else. The HTML heatmap goes to --html (default RUN_DIR/explain/STEP.html).
"""

import argparse
from pathlib import Path

from jaxtune import cli


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="run directory of a classification run")
  parser.add_argument("--step", default="latest", help="best, latest or a saved step number")
  parser.add_argument("--text", action="append", default=[], help="a text to explain (repeatable)")
  parser.add_argument("--data", help="a csv/json/jsonl/parquet file with the run's text column")
  parser.add_argument("--max-examples", type=cli.positive_int, default=10, help="with --data: explain the first N rows")
  parser.add_argument("--target", help="explain this label's logit instead of the predicted one")
  parser.add_argument("--steps", type=cli.positive_int, default=50, help="Gauss-Legendre nodes along the path")
  parser.add_argument("--baseline", default="pad", help="pad or zeros")
  parser.add_argument("--html", help="where to write the heatmap")
  args = parser.parse_args()

  import transformers

  from jaxtune import config, sharding
  from jaxtune.data import sources
  from jaxtune.errors import UserError
  from jaxtune.eval import explain
  from jaxtune.train import restore, rundir

  if bool(args.text) == bool(args.data):
    raise UserError("give --text (one or more) or --data FILE, not both and not neither.")
  run_dir = Path(args.checkpoint)
  cfg, model, params, labels, step = restore.restore(run_dir, args.step, sharding.make_mesh(config.MeshConfig()))
  if cfg.task != "classification":
    raise UserError(f"{run_dir} is a {cfg.task} run; explain.py explains classification runs.")
  texts = list(args.text)
  if args.data:
    rows = sources.load_split(args.data)
    if cfg.data.text_column not in rows.column_names:
      raise UserError(f"{args.data} has no column {cfg.data.text_column!r} (the run's data.text_column); it has "
                      f"{rows.column_names}.")
    texts = [str(t) for t in rows[cfg.data.text_column][:args.max_examples]]
  tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")
  found = explain.explain_texts(model, params, tokenizer, texts, cfg.data.max_len, labels, args.target, args.steps,
                                args.baseline)
  for exp, text in zip(found, texts):
    probs = ", ".join(f"{label} {p:.3f}" for label, p in zip(labels, exp.probs))
    print(f"{text[:100]!r}\n  explained: {labels[exp.target]} (probabilities {probs}); attributions sum "
          f"{exp.attributions.sum():+.4f}, logit difference {exp.logit - exp.baseline_logit:+.4f}")
    ranked = sorted(zip(exp.tokens, exp.attributions), key=lambda ta: -abs(ta[1]))[:8]
    print("  " + "  ".join(f"{token} {a:+.3f}" for token, a in ranked))
  out = Path(args.html) if args.html else run_dir / "explain" / f"{step}.html"
  out.parent.mkdir(parents=True, exist_ok=True)
  rundir.write_text(out, explain.to_html(found, labels, texts))
  print(f"wrote {out}")
  return 0
