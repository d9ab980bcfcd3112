"""LoRA adapters and frozen params: which params train, and attaching the adapters to a module's Denses.

An adapter on a Dense with kernel W (*in, *out) adds lora_a A (*in, rank) and lora_b B (rank, *out):
y = x W + b + (alpha / rank) dropout(x) A B. A starts as PEFT's (uniform in +-1/sqrt(fan_in)), B at zero, so
training starts from the pretrained function. In a layer stack both carry the leading `layers` axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune import params as params_lib
from jaxtune.config import LoraConfig, ModelConfig
from jaxtune.errors import UserError
from jaxtune.models import layers
from jaxtune.params import matcher

ADAPTER = r".*\.lora_[ab]"  # the param paths of adapters
is_adapter = matcher([ADAPTER])


def attach(module: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
  """Adds an adapter to every Dense whose kernel path fully matches one of cfg.targets (in place)."""
  if not cfg.on:
    return
  denses = {_path(path) + ".kernel": node for path, node in nnx.iter_graph(module) if isinstance(node, layers.Dense)}
  params = [_path(path) for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Param)]
  for pattern in cfg.targets:
    hits = [p for p in params if matcher([pattern])(p)]
    if not hits:
      raise UserError(f"model.lora.targets entry {pattern!r} matches no param; the Dense kernels are "
                      f"{_examples(denses)}.")
    if bad := [p for p in hits if p not in denses]:
      raise UserError(f"model.lora.targets entry {pattern!r} matches {bad[0]}, which is not a Dense kernel; LoRA "
                      f"adapts Dense kernels only ({_examples(denses)}).")
  match = matcher(cfg.targets)
  for i, (path, dense) in enumerate(sorted((p, d) for p, d in denses.items() if match(p))):
    kernel = dense.kernel
    axes = kernel.get_metadata()["axes"]
    lead = 1 if axes[0] == "layers" else 0  # a stacked layer's kernel is N x *in x *out
    shape = kernel.get_value().shape
    fan_in = math.prod(shape[lead:lead + dense.n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a_shape = (*shape[:lead + dense.n_in], cfg.rank)
    dense.lora_a = nnx.Param(jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound),
                             axes=(*axes[:lead + dense.n_in], "lora_rank"))
    dense.lora_b = nnx.Param(jnp.zeros((*shape[:lead], cfg.rank, *shape[lead + dense.n_in:]), jnp.float32),
                             axes=(*axes[:lead], "lora_rank", *axes[lead + dense.n_in:]))
    dense.lora_scale, dense.lora_dropout, dense.lora_id = cfg.alpha / cfg.rank, cfg.dropout, i


def frozen(paths: Iterable[str], cfg: ModelConfig) -> frozenset[str]:
  """The params that do not train: model.freeze matches, and with LoRA every loaded param but
  model.new_params and model.lora.train. A regex that matches nothing is an error (a typo would
  otherwise train everything)."""
  paths = list(paths)
  for key, patterns in (("model.freeze", cfg.freeze), ("model.lora.train", cfg.lora.train)):
    for pattern in patterns:
      if not any(matcher([pattern])(p) for p in paths):
        raise UserError(f"config key {key} entry {pattern!r} matches no param; params look like "
                        f"{_examples(paths)}.")
  freeze = matcher(cfg.freeze)
  keep = matcher([ADAPTER, *cfg.new_params, *cfg.lora.train]) if cfg.lora.on else (lambda _: True)
  out = frozenset(p for p in paths if freeze(p) or not keep(p))
  if len(out) == len(paths):
    raise UserError("every param is frozen (model.freeze / model.lora), so nothing would train; freeze fewer "
                    "params or set model.lora.targets.")
  return out


def quantised(module: nnx.Module, frozen: frozenset[str], frozen_dtype: str) -> dict[str, int]:
  """The kernels model.frozen_dtype int8 / nf4 quantises, the frozen Dense kernels of the layer stacks (path ->
  the Dense's number of input dims).

  As QLoRA, the embeddings, norms, biases and heads (an LM head, a classifier) stay in float: they are a small
  share of a deep model's weights, and the logits are the most sensitive to rounding."""
  if frozen_dtype not in ("int8", "nf4"):
    return {}
  return {_path(path) + ".kernel": node.n_in for path, node in nnx.iter_graph(module)
          if isinstance(node, layers.Dense) and _path(path) + ".kernel" in frozen
          and node.kernel.get_metadata()["axes"][0] == "layers"}


def _path(path: tuple[Any, ...]) -> str:
  return ".".join(str(k) for k in path)


def _examples(paths: Iterable[str]) -> str:
  paths = sorted(paths)
  return ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")


def adapters_off(params: Any) -> Any:
  """`params` with every adapter's lora_b at zero: the adapted Denses then compute exactly their frozen kernels
  (x A B adds 0), the model without its adapters, without a second copy of anything but B."""
  flat = params_lib.flatten(params)
  return params_lib.unflatten({p: jnp.zeros_like(v) if p.endswith(".lora_b") else v for p, v in flat.items()})
