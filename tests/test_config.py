"""Config parsing: every shipped YAML, typed dotted overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxtune import config, sharding, tasks
from jaxtune.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
  assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
  cfg = config.load(path)
  assert cfg.model.path and cfg.data.train
  sharding.rules_with(cfg.mesh.rules)  # rule overrides are checked when a run starts; check them here too


def test_scale_out_keys_parse_and_are_checked():
  cfg = config.load(CONFIGS[0], ["train.grad_accum=4", "model.remat=dots", "mesh.rules.embed=null",
                                 "mesh.rules.mlp=[fsdp, tensor]", "mesh.fsdp=2"])
  assert cfg.train.grad_accum == 4 and cfg.model.remat == "dots"
  assert dict(sharding.rules_with(cfg.mesh.rules))["embed"] == ()
  assert dict(sharding.rules_with(cfg.mesh.rules))["mlp"] == ("fsdp", "tensor")
  with pytest.raises(UserError, match="train.batch_size must be a multiple of train.grad_accum=5"):
    config.load(CONFIGS[0], ["train.grad_accum=5", "train.batch_size=32"])
  with pytest.raises(UserError, match="model.remat is 'some'"):
    config.load(CONFIGS[0], ["model.remat=some"])
  with pytest.raises(UserError, match="mesh.rules.mlp is \\['gpu'\\]"):
    sharding.rules_with(config.load(CONFIGS[0], ["mesh.rules.mlp=gpu"]).mesh.rules)
  with pytest.raises(UserError, match="mesh.rules.hidden: unknown logical axis"):
    sharding.rules_with(config.load(CONFIGS[0], ["mesh.rules.hidden=fsdp"]).mesh.rules)


def test_overrides_are_typed_like_their_field():
  path = CONFIGS[0]
  cfg = config.load(path, ["optim.lr=7e-5", "train.max_steps=20", "data.length_buckets=[16,32]",
                           "model.compute_dtype=bfloat16", "data.text_pair_column=title"])
  assert cfg.optim.lr == 7e-5 and isinstance(cfg.optim.lr, float)
  assert cfg.train.max_steps == 20 and cfg.data.length_buckets == (16, 32)
  assert cfg.model.compute_dtype == "bfloat16" and cfg.data.text_pair_column == "title"
  assert config.load(path).optim.lr != cfg.optim.lr


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "no key 'learning_rate'"),
    ("train.batch_size=abc", "train.batch_size must be int"),
    ("train.batch_size=true", "train.batch_size must be int"),
    ("train.batch_size=0", "train.batch_size is 0; it must be >= 1"),
    ("optim.schedule=step", "optim.schedule is 'step'; expected one of"),
    ("data.length_buckets=[64,32]", "strictly increasing"),
    ("mesh.data=0", "mesh.data is 0; it must be -1 or >= 1"),
    ("lr=1", "no key 'lr' at the top level"),
    ("optim.lr", "not of the form"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
    config.load(CONFIGS[0], [override])


def test_unknown_and_missing_keys_in_yaml(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: {path: x}\ndata: {train: a.csv, colour: blue}\n")
  with pytest.raises(UserError, match="unknown config key data.colour"):
    config.load(bad)
  bad.write_text("data: {train: a.csv}\n")
  with pytest.raises(UserError, match="config key model is required"):
    config.load(bad)
  with pytest.raises(UserError, match="does not exist"):
    config.load(tmp_path / "nope.yaml")


def test_round_trip_through_dict():
  cfg = config.load(CONFIGS[0])
  assert config.from_dict(config.Config, config.to_dict(cfg)) == cfg


def test_each_microbatch_must_split_over_the_batch_shards():
  from types import SimpleNamespace

  mesh = SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1})  # the check reads only the axis sizes
  cfg = config.load(CONFIGS[0], ["train.batch_size=32", "train.eval_batch_size=64", "train.grad_accum=4"])
  sharding.check_batch_sizes(cfg.train, mesh)  # 32 / 4 = 8 rows per microbatch: one per batch shard
  cfg = config.load(CONFIGS[0], ["train.batch_size=32", "train.eval_batch_size=64", "train.grad_accum=8"])
  with pytest.raises(UserError, match="train.batch_size / train.grad_accum = 4 is not divisible by the 8 batch"):
    sharding.check_batch_sizes(cfg.train, mesh)


def test_online_qa_and_ner_configs_hold_their_recipes():
  """SQuAD v1.1 + bert-base-uncased with the Flax QA example's recipe; CoNLL-2003 + roberta-base."""
  configs = Path(__file__).resolve().parents[1] / "configs"
  squad = config.load(configs / "squad_bert_base.yaml")
  assert (squad.task, squad.model.path, squad.data.train) == ("question_answering", "bert-base-uncased",
                                                              "hub:rajpurkar/squad:train")
  assert (squad.data.max_len, squad.qa.doc_stride, squad.optim.lr, squad.train.epochs, squad.train.batch_size,
          squad.optim.warmup_steps, squad.optim.weight_decay) == (384, 128, 3e-5, 2, 12, 0, 0.0)
  conll = config.load(configs / "conll2003_roberta_base.yaml")
  assert (conll.task, conll.model.path, conll.data.tags_column) == ("token_classification", "roberta-base",
                                                                    "ner_tags")
  assert conll.data.train.startswith("hub:") and tasks.checkpoint_config(conll).best_metric == "f1"  # the task's


def test_online_seq2seq_configs_parse_with_their_recipes():
  """t5-small and opus-mt-en-ro on WMT16 en-ro, bart-base on XSum."""
  configs = Path(__file__).resolve().parents[1] / "configs"
  t5 = config.load(configs / "t5_small_wmt16_en_ro.yaml")
  assert (t5.task, t5.model.path, t5.data.train, t5.data.source_column, t5.data.target_column) == (
      "seq2seq", "t5-small", "hub:wmt/wmt16:ro-en:train", "translation.en", "translation.ro")
  assert (t5.data.source_prefix, t5.optim.lr, t5.train.epochs, t5.generate.num_beams) == (
      "translate English to Romanian: ", 5e-5, 3, 1)
  marian = config.load(configs / "opus_mt_en_ro.yaml")
  assert (marian.model.path, marian.data.source_prefix, marian.generate.num_beams) == (
      "Helsinki-NLP/opus-mt-en-ro", "", 4)
  bart = config.load(configs / "bart_base_xsum.yaml")
  assert (bart.model.path, bart.data.source_column, bart.data.target_column, bart.data.max_len,
          bart.generate.num_beams) == ("facebook/bart-base", "document", "summary", 1024, 6)
  assert bart.model.new_params == (r"final_logits\.bias",)


@pytest.mark.parametrize("task, overrides, want", [
    ("classification", [], ("accuracy", "max")),
    ("question_answering", [], ("f1", "max")),
    ("token_classification", [], ("f1", "max")),
    ("causal_lm", [], ("loss", "min")),
    ("seq2seq", [], ("bleu", "max")),  # generate.predict_with_generate is on by default
    ("seq2seq", ["generate.predict_with_generate=false"], ("loss", "min")),
    ("classification", ["checkpoint.best_metric=loss"], ("loss", "min")),  # a loss is minimised unless told
    ("causal_lm", ["checkpoint.best_metric=perplexity", "checkpoint.best_mode=max"], ("perplexity", "max")),
    ("classification", ["checkpoint.best_metric="], ("", "max")),  # "" keeps no best checkpoint
])
def test_the_best_checkpoint_metric_defaults_to_the_tasks(tmp_path, task, overrides, want):
  path = tmp_path / "c.yaml"
  path.write_text(f"task: {task}\nmodel: {{path: m}}\ndata: {{train: t.csv, max_len: 256}}\n")
  cfg = config.load(path, overrides)
  assert cfg.checkpoint.best_metric is None or overrides  # the config itself leaves it to the task
  ckpt = tasks.checkpoint_config(cfg)
  assert (ckpt.best_metric, ckpt.best_direction) == want
