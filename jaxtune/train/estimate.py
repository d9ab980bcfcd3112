"""The analytic side of `jaxtune plan` (tools/plan.py) and of the fit check (train/fit.py): per-device memory from
shapes alone, training FLOPs per step, and the config changes that would make a run fit.

No compiler is involved, so these numbers are estimates: on GPUs (no deviceless GPU compile exists) they are the
plan; on TPUs the plan reads XLA's own buffer assignment and uses these only to rank the changes it suggests.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import params as params_lib
from jaxtune import sharding
from jaxtune.config import Config
from jaxtune.errors import UserError
from jaxtune.models import quant
from jaxtune.models.lora import ADAPTER
from jaxtune.models.model import Model
from jaxtune.params import matcher
from jaxtune.tasks import task_for
from jaxtune.train import perf, steps

GiB = 2**30
FUSED_ATTENTION = ("auto", "splash", "cudnn", "cpu")  # kernels that never hold the B x H x L x L scores
ADAM_COPIES = 2  # AdamW's two moments, each shaped (and sharded) like its param
LORA_TARGETS = (".*layers[.].*[.]kernel",)  # every Dense kernel of the transformer layers ([.]: no shell escapes)


def ways(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh_shape: dict[str, int],
         rules: sharding.Rules) -> int:
  """Into how many shards `rules` split an array on a mesh of `mesh_shape` (no devices needed: `spec_for` reads
  only the mesh's axis sizes)."""
  spec = sharding.spec_for(shape, axes, types.SimpleNamespace(shape=mesh_shape), rules)
  return math.prod(mesh_shape[a] for a in sharding.spec_axes(spec))


def per_device_bytes(shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...], mesh_shape: dict[str, int],
                     rules: sharding.Rules) -> float:
  """Bytes one device holds of an array placed by `rules` on a mesh of `mesh_shape`."""
  return math.prod(shape) * jnp.dtype(dtype).itemsize / ways(shape, axes, mesh_shape, rules)


def state_bytes(model: Model, mesh_shape: dict[str, int]) -> dict[str, float]:
  """Per-device bytes of the trainable params, the frozen ones as model.frozen_dtype holds them (bfloat16, or an
  int8 / NF4 kernel's codes and scales, split like the float kernel: quant.placement) and AdamW's moments (float32
  like the params)."""
  out = {"params": 0.0, "frozen_params": 0.0}
  held = params_lib.flatten(model.held[0], is_leaf=quant.is_quantised)
  for path, axes in model.axes.items():
    leaf, kept = _leaf(model.abstract, path), held[path]
    size = quant.held_bytes(kept) if quant.is_quantised(kept) else math.prod(kept.shape) * kept.dtype.itemsize
    out["frozen_params" if path in model.frozen else "params"] += size / ways(leaf.shape, axes, mesh_shape,
                                                                               model.rules)
  out["optimizer"] = ADAM_COPIES * out["params"]
  return out


def _leaf(tree: Any, path: str) -> Any:
  for key in path.split("."):
    tree = tree[key]
  return tree


def activation_bytes(cfg: Config, model: Model, mesh_shape: dict[str, int]) -> dict[str, float]:
  """Per-device bytes the backward pass keeps (activations) and the step's other temporaries (gradients, logits).

  Per token and layer, without remat, a transformer layer keeps its two norms' inputs and outputs (4 D), q, k, v
  and the attention output ((2 H + 2 KV) K), and the MLP's inputs to its down projection and activation (4 F
  gated, 2 F plain); an attention kernel that is not fused adds the H x L scores and probabilities. remat full
  keeps only each layer's input (D, in the compute dtype: the scan's carry) plus one layer recomputed; dots and
  dots_no_batch keep the matmul outputs.
  Tensor parallelism splits heads and MLP; the batch splits over its shards. The logits (vocab wide, or one
  block wide where the loss tiles the vocabulary; compute dtype plus float32 log-softmax and gradient) and the
  float32 gradients of the trainable params come on top (twice with grad_accum: the sum so far and one
  microbatch's), and under FSDP two layers' gathered float32 weights (the one computing and the next, fetched
  meanwhile).
  """
  d, f, layers, heads, head_dim, kv = perf.dims(model.hf_config)
  tp = mesh_shape.get("tensor", 1)
  rows = cfg.train.batch_size / cfg.train.grad_accum / math.prod(mesh_shape[a] for a in dict(model.rules)["batch"])
  length = cfg.data.max_len + (cfg.data.max_target_len if cfg.task == "seq2seq" else 0)
  tokens = rows * length
  b = jnp.dtype(cfg.model.compute_dtype).itemsize
  gated = model.hf_config.get("model_type") in perf.GATED or "gated" in str(
      model.hf_config.get("feed_forward_proj", ""))
  attn = 4 * d + (2 * heads + 2 * kv) * head_dim / tp
  mlp = (4 if gated else 2) * f / tp
  scores = 0 if cfg.model.attention in FUSED_ATTENTION else heads / tp * cfg.data.max_len * (b + 4)
  one_layer = tokens * ((attn + mlp) * b + scores)
  kept = {"none": layers * one_layer,
          "full": layers * tokens * d * b + one_layer,
          "dots": layers * tokens * ((2 * heads + 2 * kv) * head_dim / tp + 2 * d + 3 * f / tp) * b + one_layer}
  kept["dots_no_batch"] = kept["dots"]
  vocab = model.hf_config.get("vocab_size", 0) if cfg.task in ("causal_lm", "seq2seq", "preference") else 0
  block = steps.tile_block(model, task_for(cfg), cfg.train.loss_vocab_block, tokens)
  if block:
    vocab = min(block, vocab)  # vocabulary-tiled loss: one block's logits at a time (models/vocab.py)
  logits = tokens * vocab / tp * (b + 4 + 4)
  grads = state_bytes(model, mesh_shape)["params"] * (2 if cfg.train.grad_accum > 1 else 1)  # + the accumulator
  per_layer = sum(math.prod(_leaf(model.abstract, p).shape[1:]) for p, axes in model.axes.items()
                  if axes and axes[0] == "layers")
  gathered = 2 * per_layer * 4 / tp if mesh_shape.get("fsdp", 1) > 1 else 0.0  # this layer's and the next's
  return {"activations": kept[cfg.model.remat] + logits, "gradients": grads, "gathered_weights": gathered}


def estimate(cfg: Config, model: Model, mesh_shape: dict[str, int]) -> dict[str, float]:
  """The analytic per-device memory: state, activations and gradients, and their total."""
  parts = {**state_bytes(model, mesh_shape), **activation_bytes(cfg, model, mesh_shape)}
  return {**parts, "total": sum(parts.values())}


def flops_per_step(cfg: Config, model: Model) -> tuple[float, str]:
  """(training FLOPs of one optimiser step, how they were counted), from the model's shape.

  perf.train_flops_per_token's 6 N + 12 layers L (H K) per token is for weights that all train. A frozen weight
  still runs forward (2) and passes the gradient to its input (2) but computes no weight gradient: 4, not 6.
  The LoRA adapters, which do train, count 6 per param; the attention term has no weights and keeps its 12.
  """
  hf, task = model.hf_config, cfg.task
  length = cfg.data.max_len
  n = perf.matmul_params_per_token(hf, task)
  full = perf.train_flops_per_token(hf, length, task)
  tokens = cfg.train.batch_size * length
  if not model.frozen:
    return full * tokens, "6 x matmul params + 12 x layers x L x H x K per token (PaLM appendix B)"
  is_adapter = matcher([ADAPTER])
  sizes = {p: math.prod(_leaf(model.abstract, p).shape) for p in model.axes}
  adapters = sum(s for p, s in sizes.items() if is_adapter(p))
  base = sum(s for p, s in sizes.items() if not is_adapter(p))
  base_trained = sum(s for p, s in sizes.items() if not is_adapter(p) and p not in model.frozen)
  per_token = full - 6 * n + (4 + 2 * base_trained / base) * n + 6 * adapters
  return per_token * tokens, ("frozen base weights: 4 x params (forward + input gradients, no weight gradients), "
                              "not 6 x; trained ones and LoRA adapters 6 x; attention 12 x layers x L x H x K")


@dataclasses.dataclass(frozen=True)
class Change:
  """One config change the plan can suggest: the overrides (as scripts/finetune.py takes them) it makes."""
  why: str
  overrides: tuple[str, ...]


def candidate_changes(cfg: Config, count: int, lora: bool) -> list[Change]:
  """The changes that cut per-device memory, those that leave the training's maths alone first (a larger fsdp,
  remat, microbatches); with `lora`, adapters on a frozen base, then the base in bfloat16 and in NF4, come before
  the microbatches."""
  out = []
  sizes = sharding.mesh_sizes(cfg.mesh, count)
  if sizes[0] > 1:
    out.append(Change("shard params, gradients and Adam moments over every device (larger fsdp)",
                      ("mesh.data=1", f"mesh.fsdp={sizes[0] * sizes[1]}")))
  if cfg.model.remat != "full":
    out.append(Change("keep only each layer's input for the backward pass", ("model.remat=full",)))
  if lora and not cfg.model.lora.on:
    out.append(Change("train LoRA adapters on a frozen base: no gradients or moments for the base",
                      (f"model.lora.targets=['{LORA_TARGETS[0]}']",)))
  if lora or cfg.model.lora.on:  # the frozen base in fewer bytes: 2 per weight, then ~0.53 (QLoRA)
    smaller = {"float32": ("bfloat16", "nf4"), "bfloat16": ("nf4",), "int8": ("nf4",), "nf4": ()}[
        cfg.model.frozen_dtype]
    out += [Change(f"hold the frozen base as {d}", (f"model.frozen_dtype={d}",)) for d in smaller]
  for k in (2, 4, 8, 16, 32):
    accum = cfg.train.grad_accum * k
    if cfg.train.batch_size % accum == 0:
      out.append(Change(f"the same batch as {accum} microbatches", (f"train.grad_accum={accum}",)))
  return out


def changed(cfg: Config, overrides: list[str]) -> Config:
  """`cfg` with dotted `overrides` applied, as config.load applies them."""
  raw = config_lib.to_dict(cfg)
  for item in overrides:
    config_lib.apply_override(raw, item)
  return config_lib.from_dict(Config, raw)


def suggest(cfg: Config, build: Callable[[Config], tuple[Model, dict[str, int]]], hbm: float,
            scale: float = 1.0) -> dict[str, Any] | None:
  """The first cumulative run of `candidate_changes` whose estimate (times `scale`: the measured / estimated
  ratio of the config as given, where a compile measured it) fits `hbm`; None when none does.

  `build(cfg)` gives the model and mesh shape of a config (the model is described again for LoRA)."""
  count = math.prod(build(cfg)[1].values())
  for lora in (False, True):
    applied: list[str] = []
    for change in candidate_changes(cfg, count, lora):
      keys = {c.split("=")[0] for c in change.overrides}
      overrides = [o for o in applied if o.split("=")[0] not in keys] + list(change.overrides)
      try:
        new = changed(cfg, overrides)
        model, mesh_shape = build(new)
        sharding.check_batch_sizes(new.train, types.SimpleNamespace(shape=mesh_shape), model.rules, ("batch_size",))
      except UserError:  # a change this config cannot take (e.g. microbatches that do not split over the devices)
        continue
      applied = overrides
      total = estimate(new, model, mesh_shape)["total"] * scale
      if total <= hbm:
        return {"overrides": applied, "estimated_total_bytes": total, "why": change.why}
  return None
