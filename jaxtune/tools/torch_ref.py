"""The PyTorch yardstick: transformers' own classes trained the way HF Trainer trains them, on jaxtune's batches.

Used by the step-parity tests and scripts/torch_reference.py; it needs torch (the `test` / `demo` extras).
Both sides share only what a comparison must hold fixed: the tokenised splits, the order and padding of
the batches, and (with init="jaxtune") the initial weights. Everything that does the training is
PyTorch's or transformers': the model class, torch.optim.AdamW (fused, the Trainer's default) with the
Trainer's weight-decay groups, transformers' learning-rate schedules, torch.nn.utils.clip_grad_norm_, and
HF's gradient accumulation (each microbatch's summed loss divided by the target count of the whole batch,
then one update).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers

from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import Config, MeshConfig, OptimConfig
from jaxtune.data import batching, lm, splits
from jaxtune.errors import UserError
from jaxtune.models import FAMILIES
from jaxtune.models.model import Model
from jaxtune.tasks import TASKS, Task, metrics, task_for, text
from jaxtune.train.setup import total_steps
from jaxtune.weights import export, hf, pretrained

# jaxtune's optim.schedule names -> transformers.get_scheduler's (all warm up linearly from 0 first).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
TARGET_WEIGHTS = {"classification": "weights", "causal_lm": "loss_mask", "seq2seq": "label_mask"}  # counts targets


@dataclasses.dataclass
class Result:
  module: torch.nn.Module  # the trained transformers model
  initial: dict[str, np.ndarray]  # HF key -> the weights training started from
  records: list[dict[str, float]]  # per step: loss, grad_norm (before clipping), lr, padded length, seconds
  metrics: dict[str, dict[str, Any]]  # split -> metrics of the final model
  train_seconds: float


def build(model: Model, params: dict[str, np.ndarray], labels: Sequence[Any] | None,
          skip: Sequence[str] = (), seed: int = 0) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
  """(transformers model, its HF-keyed weights): `model`'s class and dropout rates, holding our flat `params`.

  Params whose path matches a `skip` regex keep transformers' own random init (seeded by `seed`),
  as `from_pretrained` would initialise a new head.
  """
  described = export.hf_config(model, labels, np.dtype(np.float32))
  described.update({key: getattr(model.cfg, key) for key in type(model.cfg).DROPOUT_KEYS})  # ours, e.g. model.dropout
  config = transformers.AutoConfig.for_model(described.pop("model_type"), **described)
  torch.manual_seed(seed)
  module = getattr(transformers, export.architecture(model.family, getattr(model.cfg, "head", "")))(config).float()
  tensors = export.hf_tensors(model, params)
  param_map = FAMILIES[model.family].param_map(model.cfg)
  is_skipped = params_lib.matcher(skip)
  skipped = {key for path, (hf_key, _) in param_map.items() if is_skipped(path)
             for key in hf.layer_keys(hf_key, params[path].shape)}
  missing, unexpected = module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()
                                                if k not in skipped}, strict=False)
  state = module.state_dict()
  loaded = {state[k].data_ptr() for k in tensors if k in state}
  tied = {k for k in missing if state[k].data_ptr() in loaded}  # aliases of a loaded tensor (tied embeddings)
  if unexpected or set(missing) - skipped - tied:
    raise RuntimeError(f"{type(module).__name__} does not take our weights: missing {sorted(set(missing) - skipped)}"
                       f", unexpected {unexpected}")
  return module, {k: v.detach().numpy().copy() for k, v in module.state_dict().items() if k in tensors}


def optimizer(module: torch.nn.Module, cfg: OptimConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
  """HF Trainer's optimizer and schedule: torch's fused AdamW (its default `optim` from torch 2.8 on), decaying
  what the Trainer decays (not biases or norm weights), and transformers' schedule."""
  decay = set(transformers.Trainer.get_decay_parameter_names(None, module))  # the Trainer's own rule
  named = list(module.named_parameters())
  groups = [{"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, fused=True)
  sched = transformers.get_scheduler(SCHEDULES[cfg.schedule], opt, num_warmup_steps=min(cfg.warmup_steps, steps),
                                     num_training_steps=steps)
  return opt, sched


def per_target_loss(module: torch.nn.Module, task: str, batch: dict[str, np.ndarray], packed: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
  """(cross-entropy per target, target weights, logits): per row (classification) or per token (causal LM,
  seq2seq). `packed` causal-LM rows (plain text, data.pack) run one document per row (`_documents`)."""
  t = {k: torch.from_numpy(v) for k, v in batch.items()}
  cross_entropy = torch.nn.functional.cross_entropy
  if task == "classification":
    logits = module(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long(),
                    token_type_ids=t["token_type_ids"].long()).logits
    return cross_entropy(logits, t["labels"].long(), reduction="none"), t["weights"], logits
  if task == "seq2seq":  # transformers makes the decoder's input from the labels itself (its own shift and start)
    labels = t["labels"].long().masked_fill(t["label_mask"] == 0, -100)
    logits = module(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long(), labels=labels).logits
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    return loss.view_as(t["label_mask"]), t["label_mask"], logits
  if packed:
    return _documents(module, batch)
  if (batch["segment_ids"] > 1).any():
    raise UserError("the PyTorch reference takes one document per row unless the data is packed plain text, but "
                    "these rows hold several; set data.pack=false.")
  logits = module(input_ids=t["input_ids"].long(), attention_mask=(t["segment_ids"] > 0).long(),
                  position_ids=t["positions"].long()).logits
  loss = cross_entropy(logits.flatten(0, 1), t["targets"].long().flatten(), reduction="none")
  return loss.view_as(t["loss_mask"]), t["loss_mask"], logits


def packs(cfg: Config) -> bool:
  """Whether cfg's causal-LM rows pack plain-text documents (data.pack; prompt/response and chat rows never do)."""
  d = cfg.data
  return cfg.task == "causal_lm" and d.pack and not (d.prompt_column or d.prompt_template or d.messages_column)


def document_targets(segment_ids: np.ndarray) -> np.ndarray:
  """The target weights `_documents` trains packed rows with: 1 on every token of a segment but its last."""
  last = np.ones_like(segment_ids, bool)
  last[:, :-1] = segment_ids[:, :-1] != segment_ids[:, 1:]
  return ((segment_ids > 0) & ~last).astype(np.float32)


def _documents(module: torch.nn.Module, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, None]:
  """Packed causal-LM rows as HF trains documents: each segment (a document, or the part of one a row holds) its
  own right-padded row with positions from 0, every token but its last predicting the next one. The targets and
  the mask are made here from the tokens, not read from jaxtune's batch; the per-token losses go back to the
  packed layout."""
  segments = batch["segment_ids"]
  docs = [(r, np.flatnonzero(segments[r] == s)) for r in range(len(segments)) for s in np.unique(segments[r]) if s]
  if not docs:  # padding rows only
    return torch.zeros(segments.shape, dtype=torch.float64), torch.zeros(segments.shape), None
  length = max(len(where) for _, where in docs)
  ids, mask = np.zeros((len(docs), length), np.int64), np.zeros((len(docs), length), np.int64)
  for d, (r, where) in enumerate(docs):
    ids[d, :len(where)], mask[d, :len(where)] = batch["input_ids"][r, where], 1
  logits = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  loss = torch.zeros(segments.shape, dtype=logits.dtype)
  weight = torch.zeros(segments.shape, dtype=torch.float32)
  for d, (r, where) in enumerate(docs):
    n = len(where)
    loss[r, where[:-1]] = torch.nn.functional.cross_entropy(logits[d, :n - 1], torch.from_numpy(ids[d, 1:n]),
                                                            reduction="none")
    weight[r, where[:-1]] = 1.0
  return loss, weight, None


def train_step(module: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, micro: Sequence[dict[str, np.ndarray]],
               task: str, clip_norm: float, packed: bool = False) -> dict[str, float]:
  """One update from the microbatches of a batch; the loss and gradient norm before clipping, the lr used."""
  weights = [document_targets(m["segment_ids"]) if packed else m[TARGET_WEIGHTS[task]] for m in micro]
  count = max(sum(float(w.sum()) for w in weights), 1.0)
  total = 0.0
  for m in micro:
    loss, weight, _ = per_target_loss(module, task, m, packed)
    summed = (loss * weight).sum()
    (summed / count).backward()  # HF's accumulation: normalised by the whole batch's count
    total += float(summed.detach())
  # torch sums float32 squares one after another on CPU (tests/test_step_parity.py measures the drift), so
  # the norm recorded is summed in float64; clipping stays torch's own, as in HF Trainer.
  norm = math.sqrt(sum(float(torch.sum(p.grad.double() ** 2)) for p in module.parameters() if p.grad is not None))
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
  lr = sched.get_last_lr()[0]
  opt.step()
  sched.step()
  opt.zero_grad(set_to_none=True)
  return {"loss": total / count, "grad_norm": norm, "lr": float(lr)}


def microbatches(task: Task, data: Any, rows: np.ndarray, k: int, cfg: Config) -> list[dict[str, np.ndarray]]:
  """K consecutive slices of a batch's rows, each padded on its own, as HF's dataloader would give them."""
  size = len(rows) // k
  return [task.collate(data, rows[i * size:(i + 1) * size], size, cfg) for i in range(k)]


@torch.no_grad()
def score(module: torch.nn.Module, task_name: str, data: Any, cfg: Config, labels: Any) -> dict[str, Any]:
  """The task's metrics (jaxtune's own formulas) from the model's per-row outputs on every row of `data`."""
  packed = packs(cfg)
  module.eval()
  outputs: dict[str, list[np.ndarray]] = {}
  task = TASKS[task_name]
  for rows in batching.eval_batches(len(data), cfg.train.eval_batch_size):
    loss, weight, logits = per_target_loss(module, task_name, task.collate(data, rows, cfg.train.eval_batch_size, cfg),
                                           packed)
    if task_name == "classification":
      out = {"loss": loss, "pred": logits.argmax(-1)}
    else:
      out = {"loss_sum": (loss * weight).sum(-1), "tokens": weight.sum(-1)}
    for key, value in out.items():
      outputs.setdefault(key, []).append(value.numpy()[:len(rows)])
  return task.metrics({k: np.concatenate(v) for k, v in outputs.items()}, data, labels, cfg)


@torch.no_grad()
def exact_match(module: torch.nn.Module, tokenizer: Any, cfg: Config, rows: Any) -> dict[str, Any]:
  """evaluate.exact_match with transformers' generate: left-padded prompts, greedy (or sampled) new tokens."""
  module.eval()
  prompts = [lm.encode_prompt(p, tokenizer, cfg.data.use_chat_template) for p in rows[text.PROMPT]]
  eos = lm.eos_id(tokenizer)
  g = cfg.generate
  gen = transformers.GenerationConfig(max_new_tokens=g.max_new_tokens, do_sample=g.temperature > 0,
                                      temperature=g.temperature or None, top_p=g.top_p if g.temperature else None,
                                      eos_token_id=eos, pad_token_id=eos)
  outputs = []
  for i in range(0, len(prompts), cfg.train.eval_batch_size):
    chunk = prompts[i:i + cfg.train.eval_batch_size]
    length = max(len(p) for p in chunk)
    ids, mask = np.full((len(chunk), length), eos), np.zeros((len(chunk), length), np.int64)
    for r, p in enumerate(chunk):
      ids[r, length - len(p):], mask[r, length - len(p):] = p, 1
    new = module.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          generation_config=gen).numpy()[:, length:]
    outputs += [row[:np.flatnonzero(row == eos)[0] + 1] if (row == eos).any() else row for row in new]
  return metrics.exact_match(outputs, [eos], tokenizer, rows[cfg.data.response_column])


def finetune(cfg: Config, init: str = "jaxtune", score_splits: Sequence[str] = ("validation", "test"),
             limit: int | None = None, log: Any = None, dtype: torch.dtype = torch.float32) -> Result:
  """Trains cfg's model on cfg's data with PyTorch, batch for batch as scripts/finetune.py would.

  init="jaxtune" starts from exactly jaxtune's initial weights (new params included); init="torch"
  leaves the new params (model.new_params) to transformers' own seeded init. The final model is
  scored on each configured split of `score_splits` (the first `limit` rows of test, when given).
  dtype=torch.float64 gives the exact trajectory that float32 runs (ours or torch's) approximate.
  """
  if init not in ("jaxtune", "torch"):
    raise UserError(f"init {init!r} is not one of jaxtune, torch.")
  if cfg.task not in TARGET_WEIGHTS:
    raise UserError(f"the PyTorch reference trains {sorted(TARGET_WEIGHTS)} runs, not task {cfg.task}.")
  task = task_for(cfg)
  tokenizer = pretrained.load_tokenizer(cfg.model)
  configured = [n for n in score_splits
                if splits.specs(cfg.data).get(n) or (n == "validation" and cfg.data.validation_holdout)]
  labels, encoded = task.load(cfg, tokenizer, ["train", *configured])
  per_epoch, steps = total_steps(cfg, len(encoded["train"]))
  mesh = sharding.make_mesh(MeshConfig(data=1))
  model, params = pretrained.from_pretrained(cfg.model, len(labels or ()), mesh, cfg.train.seed, cfg.task)
  flat = {p: np.asarray(a) for p, a in params_lib.flatten(params).items()}
  module, initial = build(model, flat, labels, cfg.model.new_params if init == "torch" else (), cfg.train.seed)
  del params, flat  # the JAX copy is not needed again
  module = module.to(dtype)
  opt, sched = optimizer(module, cfg.optim, steps)
  module.train()
  records, start = [], time.perf_counter()
  train = encoded["train"]
  for step, rows in enumerate(batching.step_batches(train.lengths, cfg.train.batch_size, cfg.train.seed,
                                                    cfg.data.group_by_length, per_epoch, 0, steps), 1):
    tick = time.perf_counter()
    micro = microbatches(task, train, rows, cfg.train.grad_accum, cfg)
    record = train_step(module, opt, sched, micro, cfg.task, cfg.optim.clip_norm, packs(cfg))
    records.append({**record, "length": int(micro[0]["input_ids"].shape[1]), "seconds": time.perf_counter() - tick})
    if log is not None and (step % cfg.train.log_every == 0 or step == steps):
      log(step, steps, records[-1])
  seconds = time.perf_counter() - start
  metrics = {}
  for name in configured:
    data = encoded[name]
    if name == "test" and limit:
      data = task.load(cfg, tokenizer, ["test"], labels=labels, limit=limit)[1]["test"]
    metrics[name] = score(module, cfg.task, data, cfg, labels)
    if cfg.generate.exact_match and name == "test":
      rows = splits.load_raw(cfg.data, cfg.train.seed, ["test"], limit=limit)["test"]
      metrics[name].update(exact_match(module, tokenizer, cfg, text.with_prompts(rows, cfg, "test")))
  return Result(module, initial, records, metrics, seconds)
