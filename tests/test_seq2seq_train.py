"""task: seq2seq end to end on a tiny T5 and real review text (review -> "great" / "other", text to text):
fine-tune, checkpoint, evaluate.py with generation (BLEU, ROUGE, the predictions file), export, and transformers'
generate on the export giving our predictions."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import records, run_script, seq2seq_config

from jaxtune import config, tasks
from jaxtune.tasks import TASKS, metrics
from jaxtune.train.checkpoints import Checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_t5_dir, reviews):
  tmp = tmp_path_factory.mktemp("seq2seq")
  cfg = seq2seq_config(tmp / "c.yaml", tiny_t5_dir, reviews, optim={"lr": 3e-3, "warmup_steps": 4},
                       train={"batch_size": 16, "max_steps": 30, "eval_every": 15, "log_every": 5},
                       checkpoint={"best_metric": None, "best_mode": None})  # the task's: BLEU
  result = run_script("finetune.py", "--config", cfg, "--run-dir", tmp / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp / "run"


@pytest.fixture(scope="module")
def evaluated(run):
  """step -> (evaluate.py's metrics, its predictions file) on the test split, for the pretrained and trained T5."""
  out = {}
  for step in ("base", "30"):
    result = run_script("evaluate.py", "--checkpoint", run, "--step", step, "--split", "test")
    assert result.returncode == 0, result.stderr[-3000:]
    path = run / "eval" / f"test-{0 if step == 'base' else step}.json"
    out[step] = json.loads(path.read_text()), json.loads(path.with_name(path.stem + ".predictions.json").read_text())
  return out


def test_fine_tuning_improves_loss_and_generations(run, evaluated):
  steps = [r for r in records(run) if r.get("split") == "validation"]
  assert [r["step"] for r in steps] == [15, 30]
  # BLEU picks the best checkpoint, so validation generated and scored the targets; --step best is its best step.
  bleu = {r["step"]: r["bleu"] for r in steps}
  assert all({"bleu", "rouge1", "generated_length"} <= set(r) for r in steps)
  ckpts = Checkpoints(run, tasks.checkpoint_config(config.load(run / "config.yaml")), read_only=True)
  assert ckpts.cfg.best_metric == "bleu" and bleu[ckpts.resolve("best")] == max(bleu.values())
  (base, base_rows), (trained, rows) = evaluated["base"], evaluated["30"]
  assert trained["loss"] < base["loss"] - 2.0  # ln(30522) = 10.3 at random; two words to learn
  assert trained["rouge1"] > base["rouge1"] + 0.3, (base, trained)  # the words are generated, not just scored
  assert len(rows) == len(base_rows) == trained["num_examples"] == 40
  assert {r["reference"] for r in rows} == {"great", "other"}
  # The reported metrics are those of the written predictions.
  predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
  assert trained["bleu"] == pytest.approx(metrics.bleu(predictions, references))
  assert trained["rouge1"] == pytest.approx(metrics.rouge(predictions, references)["rouge1"])


def test_export_generates_our_predictions_in_transformers(run, evaluated, tmp_path):
  _, rows = evaluated["30"]
  result = run_script("export_hf.py", "--checkpoint", run, "--step", "30", "--output", tmp_path / "hf")
  assert result.returncode == 0, result.stderr[-3000:]
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  sources = [r["source"] for r in rows[:6]]
  batch = tokenizer(sources, max_length=64, truncation=True, padding=True, return_tensors="pt")
  with torch.no_grad():
    out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                         do_sample=False, num_beams=1)
  theirs = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
  assert theirs == [r["prediction"] for r in rows[:6]]


def test_dotted_columns_read_nested_translation_rows(tmp_path, tiny_t5_dir, reviews):
  """WMT rows hold {"translation": {"en": ..., "ro": ...}}: data.source_column translation.en reads the field."""
  rows = [{"translation": {"en": f"house number {i}", "ro": f"casa numărul {i}"}} for i in range(5)]
  (tmp_path / "wmt.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  cfg = config.load(seq2seq_config(tmp_path / "c.yaml", tiny_t5_dir, reviews),
                    [f"data.train={tmp_path / 'wmt.jsonl'}", "data.source_column=translation.en",
                     "data.target_column=translation.ro", "data.validation_holdout=0"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_t5_dir)
  _, data = TASKS["seq2seq"].load(cfg, tokenizer, ["train"])
  assert list(data["train"].sources) == [r["translation"]["en"] for r in rows]  # a memory-mapped cache.Texts
  assert list(data["train"].references) == [r["translation"]["ro"] for r in rows]
  assert tokenizer.decode(data["train"].labels[2], skip_special_tokens=True) == "casa numarul 2"  # uncased vocab
