"""Mixture-of-experts MLPs for the Llama-family decoder: Qwen3-MoE (model_type qwen3_moe) and Mixtral (mixtral).

Each block's MLP is E SwiGLU experts of width F behind a linear router, routed as transformers does: the router's
logits softmaxed in float32 over the E experts, each token sent to the K most probable, those K weights renormalised
to sum to 1 where norm_topk_prob (Mixtral always), the output the weighted sum of those K experts' outputs. The
experts are stacked on a leading `expert` axis (E x D x F) that sharding.RULES puts on fsdp (there is no expert mesh
axis), F on tensor.

Dispatch is dropless (no capacity, no token dropped): each device, under shard_map, sorts its own B L K (token,
expert) rows by expert, runs them through grouped matmuls (jax.lax.ragged_dot: gate and up as one, then down) and
adds each row, weighted, back to its token. The experts arrive gathered over fsdp like any FSDP weight (no all-to-all,
no expert-parallel compute); a split F stays split and the partial outputs are summed over its mesh axes.
Cost: on TPU ragged_dot is XLA's grouped matmul, 2 x 3 M D F FLOPs forward. In this jax (0.10) on CPU (and on GPU)
it is lowered as E zero-padded copies of the M rows (an E x M x D temporary) in one dense dot: E times those FLOPs,
K times more than running every expert on every token. Right for tests and small models; too slow and too large to
train a real MoE there.

Training adds router_aux_loss_coef x transformers' load_balancing_loss_func (`aux_loss`) where config.json says
output_router_logits. Checkpoints hold one tensor per expert (save_pretrained writes them so in transformers 5 as in
4), read into our stacks by the `{e}` keys of weights/hf.py.
Dimensions: N layers, B batch, L length, D model dim, E experts, K experts a token (top-k), F an expert's width,
M = B L K routed rows (a device's own under shard_map).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxtune import sharding
from jaxtune.errors import UserError
from jaxtune.models import layers

if TYPE_CHECKING:
  from jaxtune.models.llama import LlamaConfig

# model_type -> (the MLP's module name in the checkpoint, our expert param -> its per-expert tensor name there)
CHECKPOINT_NAMES = {
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
}


def read_config(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(an MoE's config.json as the dense family whose attention it shares, its LlamaConfig expert fields); any other
  config.json comes back as it is, with no expert fields."""
  model_type = hf.get("model_type")
  if model_type == "mixtral":
    if hf.get("router_jitter_noise"):
      raise UserError(f"mixtral router_jitter_noise {hf['router_jitter_noise']} (training noise on the router's input) "
                      "is not supported; set it to 0.0 in config.json, as the released Mixtral checkpoints have it.")
    experts, width, renormalise = hf["num_local_experts"], hf["intermediate_size"], True
    dense = {**hf, "model_type": "mistral"}  # Mistral's attention: sliding_window where set
  elif model_type == "qwen3_moe":
    n, step, dense_only = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    # transformers 5 writes the count as num_local_experts (as Mixtral's); Qwen3-MoE's hub configs say num_experts
    experts = hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]
    width, renormalise = hf["moe_intermediate_size"], hf.get("norm_topk_prob", False)
    routed = [i for i in range(n) if experts > 0 and i not in dense_only and (i + 1) % step == 0]
    if 0 < len(routed) < n:
      raise UserError(f"qwen3_moe with dense MLPs on layers {sorted(set(range(n)) - set(routed))} (mlp_only_layers "
                      f"{dense_only}, decoder_sparse_step {step}) is not supported: jaxtune's layer stack needs every "
                      "layer alike; the released Qwen3-MoE checkpoints route every layer.")
    # Qwen3's attention; HF's Qwen3-MoE slides on every layer when use_sliding_window (it has no max_window_layers)
    dense, experts = {**hf, "model_type": "qwen3", "max_window_layers": 0}, experts if routed else 0
  else:
    return hf, {}
  k = hf["num_experts_per_tok"]
  if experts and not 0 < k <= experts:
    raise UserError(f"{model_type} num_experts_per_tok {k} should be between 1 and the {experts} experts; use the "
                    "checkpoint's own config.json.")
  return dense, {"num_experts": experts, "num_experts_per_tok": k if experts else 0,
                 "moe_intermediate_size": width if experts else 0, "norm_topk_prob": bool(renormalise),
                 "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
                 "output_router_logits": bool(hf.get("output_router_logits", False))}


class MoE(nnx.Module):
  """E SwiGLU experts behind a top-k softmax router, dispatched dropless by grouped matmuls (see the module doc)."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    normal = jax.nn.initializers.normal(0.02)
    self.router = layers.param(rngs, normal, (d, e), ("embed", "expert"))
    self.gate = layers.param(rngs, normal, (e, d, f), ("expert", "embed", "mlp"))
    self.up = layers.param(rngs, normal, (e, d, f), ("expert", "embed", "mlp"))
    self.down = layers.param(rngs, normal, (e, f, d), ("expert", "mlp", "embed"))
    self.num_experts, self.top_k, self.renormalise = e, cfg.num_experts_per_tok, cfg.norm_topk_prob
    self.act = layers.ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x_BxLxD: jax.Array, ctx: layers.Context,
               real_BxL: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(the MoE's output, and over the `real` tokens each expert's assignments and summed router probability)."""
    dtype, e = x_BxLxD.dtype, self.num_experts
    logits_BxLxE = x_BxLxD @ self.router[...].astype(dtype)
    probs_BxLxE = jax.nn.softmax(logits_BxLxE.astype(jnp.float32), axis=-1)
    weights_BxLxK, experts_BxLxK = jax.lax.top_k(probs_BxLxE, self.top_k)
    if self.renormalise:
      weights_BxLxK = weights_BxLxK / weights_BxLxK.sum(-1, keepdims=True)
    kernels = [w[...].astype(dtype) for w in (self.gate, self.up, self.down)]
    y_BxLxD = dispatch(x_BxLxD, experts_BxLxK, weights_BxLxK.astype(dtype), kernels, self.act, ctx)
    real_BxLx1 = real_BxL.astype(jnp.float32)[..., None]
    picked_E = (jax.nn.one_hot(experts_BxLxK, e, dtype=jnp.float32) * real_BxLx1[..., None]).sum((0, 1, 2))
    return y_BxLxD, (picked_E, (probs_BxLxE * real_BxLx1).sum((0, 1)))


def dispatch(x_BxLxD: jax.Array, experts_BxLxK: jax.Array, weights_BxLxK: jax.Array, kernels: list[jax.Array],
             act: Callable[[jax.Array], jax.Array], ctx: layers.Context) -> jax.Array:
  """Each token's K expert outputs, weighted and summed; on a mesh each device routes its own tokens (shard_map)."""
  if ctx.mesh is None:
    return _grouped(x_BxLxD, experts_BxLxK, weights_BxLxK, *kernels, act=act)
  tokens = sharding.spec_for(x_BxLxD.shape, ("batch", "length", None), ctx.mesh, ctx.rules)
  # F stays split over the mlp rule's mesh axes that do not split the tokens: a partial down-projection to sum
  mlp = sharding.spec_for(kernels[0].shape, (None, None, "mlp"), ctx.mesh, ctx.rules)
  split = tuple(a for a in sharding.spec_axes(mlp) if a not in sharding.spec_axes(tokens))
  f = split or None
  specs = (tokens, tokens, tokens, P(None, None, f), P(None, None, f), P(None, f, None))
  return _sharded(act, split, ctx.mesh, specs, tokens)(x_BxLxD, experts_BxLxK, weights_BxLxK, *kernels)


@functools.cache  # jitted and kept: an eager call (a model applied without jit) would compile shard_map every time
def _sharded(act: Callable[[jax.Array], jax.Array], split: tuple[str, ...], mesh: Mesh, specs: tuple[P, ...],
             out: P) -> Callable[..., jax.Array]:
  """_grouped per device under shard_map, its partial outputs summed over the mesh axes `split` splits F over."""

  def routed(*args: jax.Array) -> jax.Array:
    y_BxLxD = _grouped(*args, act=act)
    return jax.lax.psum(y_BxLxD, split) if split else y_BxLxD

  return jax.jit(jax.shard_map(routed, mesh=mesh, in_specs=specs, out_specs=out))


def _grouped(x_BxLxD: jax.Array, experts_BxLxK: jax.Array, weights_BxLxK: jax.Array, gate_ExDxF: jax.Array,
             up_ExDxF: jax.Array, down_ExFxD: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """The routed rows sorted by expert, the experts' SwiGLU as grouped matmuls, each row weighted and added back."""
  b, length, d = x_BxLxD.shape
  k, e, f = experts_BxLxK.shape[-1], gate_ExDxF.shape[0], gate_ExDxF.shape[-1]
  experts_M = experts_BxLxK.reshape(-1)
  order_M = jnp.argsort(experts_M, stable=True)
  token_M = order_M // k  # the token behind each sorted row
  sizes_E = jnp.bincount(experts_M, length=e).astype(jnp.int32)
  x_MxD = x_BxLxD.reshape(-1, d)[token_M]
  h_Mx2F = jax.lax.ragged_dot(x_MxD, jnp.concatenate([gate_ExDxF, up_ExDxF], axis=-1), sizes_E)
  y_MxD = jax.lax.ragged_dot(act(h_Mx2F[:, :f]) * h_Mx2F[:, f:], down_ExFxD, sizes_E)
  y_MxD = y_MxD * weights_BxLxK.reshape(-1)[order_M][:, None]
  return jnp.zeros((b * length, d), y_MxD.dtype).at[token_M].add(y_MxD).reshape(b, length, d)


def aux_loss(load: tuple[jax.Array, jax.Array], real_BxL: jax.Array, cfg: LlamaConfig) -> jax.Array:
  """router_aux_loss_coef x transformers' load_balancing_loss_func: E x the sum over experts of (assignments to it / R)
  x (its router probability summed / R), R = N x the real tokens (every layer's routing of them counted)."""
  picked_NxE, probs_NxE = load
  rows = picked_NxE.shape[0] * jnp.maximum(real_BxL.astype(jnp.float32).sum(), 1.0)
  balance = cfg.num_experts * jnp.sum(picked_NxE.sum(0) / rows * (probs_NxE.sum(0) / rows))
  return cfg.router_aux_loss_coef * balance


def expert_param_map(param_map: dict[str, tuple[str, str]], cfg: LlamaConfig,
                     model_type: str) -> dict[str, tuple[str, str]]:
  """Llama's param map with the dense MLP's entries replaced by the router's and the experts' (N x E stacks read
  from one checkpoint tensor per layer {i} and expert {e})."""
  if not cfg.num_experts:
    return param_map
  module, names = CHECKPOINT_NAMES[model_type]
  theirs = f"model.layers.{{i}}.{module}"
  m = {path: entry for path, entry in param_map.items() if not path.startswith("layers.mlp.")}
  m["layers.mlp.router"] = (f"{theirs}.gate.weight", "linear")
  for ours, name in names.items():
    m[f"layers.mlp.{ours}"] = (f"{theirs}.experts.{{e}}.{name}.weight", "linear")
  return m
