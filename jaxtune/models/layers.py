"""Building blocks shared by the models: annotated params, Dense, LayerNorm, dropout, scanned layer stacks."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxtune import sharding
from jaxtune.models import quant

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
# model.remat -> what a layer keeps for the backward pass (None: no rematerialisation at all).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a model call hands each of its layers, explicitly (Model.apply builds it): the mesh and rules that
  place its activations, and the dropout key of its LoRA adapters (training with model.lora.dropout only)."""
  mesh: Mesh | None = None  # None: activations left where XLA puts them (a layer called on its own)
  rules: sharding.Rules = sharding.RULES
  adapter_rng: jax.Array | None = None  # inside a layer stack, the layer's own key (see `scan`)
  attention: str = "auto"  # model.attention: which kernel attention.attend runs (chosen for the mesh's devices)

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the sharding of its logical `axes` (the identity without a mesh)."""
    return x if self.mesh is None else sharding.constrain(x, axes, self.mesh, self.rules)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter whose `axes` metadata names each dimension logically (see sharding.py)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), axes=tuple(axes))


class Dense(nnx.Module):
  """y = x . kernel + bias, contracting x's trailing `in_shape` dims; kernel is (*in, *out)."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Sequence[str | None],
               out_axes: Sequence[str | None], *, rngs: nnx.Rngs, std: float = 0.02, use_bias: bool = True):
    self.kernel = param(rngs, jax.nn.initializers.normal(std), (*in_shape, *out_shape), (*in_axes, *out_axes))
    self.bias = param(rngs, jax.nn.initializers.zeros, out_shape, out_axes) if use_bias else None
    self.n_in = len(in_shape)
    # A LoRA adapter (models/lora.py attaches it): lora_a (*in, rank), lora_b (rank, *out).
    self.lora_a: nnx.Param | None = nnx.data(None)
    self.lora_b: nnx.Param | None = nnx.data(None)
    self.lora_scale, self.lora_dropout, self.lora_id = 0.0, 0.0, 0

  def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
    kernel = self.kernel.get_value()
    if quant.is_quantised(kernel):  # a frozen int8 / NF4 kernel (model.frozen_dtype), dequantised here, per layer
      y = quant.matmul(x, kernel, self.n_in)
    else:
      y = contract(x, kernel.astype(x.dtype), self.n_in)
    y = y if self.bias is None else y + self.bias[...].astype(x.dtype)
    return y if self.lora_a is None else y + self.adapter(x, ctx)

  def adapter(self, x: jax.Array, ctx: Context) -> jax.Array:
    """The adapter's term: (alpha / rank) * dropout(x) A B, as PEFT's LoRA layers compute it."""
    if ctx.adapter_rng is not None and self.lora_dropout > 0:
      x = dropout(x, self.lora_dropout, jax.random.fold_in(ctx.adapter_rng, self.lora_id))
    h = jnp.tensordot(x, self.lora_a[...].astype(x.dtype), axes=self.n_in)  # ... x rank
    return jnp.tensordot(h, self.lora_b[...].astype(x.dtype), axes=1) * jnp.asarray(self.lora_scale, x.dtype)


def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """tensordot(x, kernel, n_in): x (*tokens, *in) . kernel (*in, *out) -> (*tokens, *out).

  The kernel's gradient contracts the tokens of x and of the output gradient dy, and XLA:CPU's
  matmul library wants that dimension minor in its left operand, so one of the two is transposed
  first. JAX's own rule computes dy^T x, which transposes dy; where the output is the wider side
  (BERT's query/key/value and intermediate, Llama's gate/up) `_contract_bwd` computes x^T dy and
  transposes the narrower x instead.
  """
  if math.prod(kernel.shape[:n_in]) < math.prod(kernel.shape[n_in:]):
    return _contract(x, kernel, n_in)
  return jnp.tensordot(x, kernel, axes=n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  return jnp.tensordot(x, kernel, axes=n_in)


def _contract_fwd(x: jax.Array, kernel: jax.Array, n_in: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return jnp.tensordot(x, kernel, axes=n_in), (x, kernel)


def _contract_bwd(n_in: int, residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, kernel = residuals
  tokens = tuple(range(x.ndim - n_in))
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(len(tokens), dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())))
  dkernel = jax.lax.dot_general(x, dy, ((tokens, tokens), ((), ())))  # (*in, *out): the kernel's own layout
  return dx, dkernel


_contract.defvjp(_contract_fwd, _contract_bwd)


def dense_many(denses: Sequence[Dense], x: jax.Array, ctx: Context) -> list[jax.Array]:
  """[d(x) for d in denses] as one matmul against their kernels stacked on a new axis (equal shapes).

  One larger matmul keeps the cores busier than several small ones (BERT's query, key and value;
  Llama's key and value, and gate and up). The new axis is not sharded, so each kernel keeps its own sharding.
  """
  if any(quant.is_quantised(d.kernel.get_value()) for d in denses):
    return [d(x, ctx) for d in denses]
  first = denses[0]
  kernel = jnp.stack([d.kernel[...] for d in denses], axis=first.n_in).astype(x.dtype)
  y = contract(x, kernel, first.n_in)  # ... x len(denses) x out
  if first.bias is not None:
    y = y + jnp.stack([d.bias[...] for d in denses]).astype(x.dtype)
  at = x.ndim - first.n_in
  ys = [y[(slice(None),) * at + (i,)] for i in range(len(denses))]
  return [y if d.lora_a is None else y + d.adapter(x, ctx) for d, y in zip(denses, ys)]


class LayerNorm(nnx.Module):
  """LayerNorm over the last dim, computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",))
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32: no centring, no bias (Llama's and T5's norm).

  With `plus_one` (Gemma's) the stored weight is the offset from 1: x / rms(x) * (1 + scale), scale initially 0.
  """

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, axis: str = "embed", plus_one: bool = False):
    init = jax.nn.initializers.zeros if plus_one else jax.nn.initializers.ones
    self.scale = param(rngs, init, (dim,), (axis,))  # axis: head_dim for a per-head norm
    self.eps, self.plus_one = eps, plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (self.scale[...] + 1.0 if self.plus_one else self.scale[...])).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """tanh(x / cap) * cap: Gemma 2's soft cap on attention scores and logits (x itself when cap is None)."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def lookup(table_VxD: jax.Array, ids_BxL: jax.Array, padding_id: int | None = None) -> jax.Array:
  """table[ids]; the `padding_id` row gets no gradient through this lookup, as torch.nn.Embedding(padding_idx).

  transformers builds BERT's and the Llama family's token embeddings with padding_idx=pad_token_id, so
  that row never learns from its inputs. It matters where the pad token is a real one: SmolLM2 pads
  with <|im_end|>, the end-of-turn token every chat example is trained to emit (its tied output row
  still learns, as in PyTorch).
  """
  x_BxLxD = table_VxD[ids_BxL]
  if padding_id is None:
    return x_BxLxD
  return jnp.where((ids_BxL == padding_id)[..., None], jax.lax.stop_gradient(x_BxLxD), x_BxLxD)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None (evaluation) or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = keep_mask(rng, x.shape, 1.0 - rate)
  # Scaled in float32: 1 / (1 - rate) in bfloat16 would be off by up to 0.4% (0.16% at rate 0.1).
  return jnp.where(keep, x.astype(jnp.float32) / (1.0 - rate), 0).astype(x.dtype)


def keep_mask(rng: jax.Array, shape: Sequence[int], keep: float) -> jax.Array:
  """Bernoulli(keep) per element: a keyed integer hash of each element's flat index.

  On a CPU, threefry draws for every attention probability cost more than many of the step's matmuls;
  this hash is a few integer ops per element. Two rounds of the `lowbias32` mixer (C. Wellons; full avalanche) keyed
  by two 32-bit words threefry draws from `rng`, so masks are a pure function of (key, shape): resume
  replays them, and every mesh layout gets the same mask. The keep threshold has 2^-32 resolution.
  """
  size = math.prod(shape)
  if size >= 2**32:  # the flat index would wrap: use threefry
    return jax.random.bernoulli(rng, keep, tuple(shape))
  k0, k1 = jax.random.bits(rng, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = _mix32(_mix32(index + k0) ^ k1)
  return bits < jnp.uint32(min(round(keep * 2**32), 2**32 - 1))


def _mix32(x: jax.Array) -> jax.Array:
  """lowbias32: a bijective uint32 -> uint32 hash whose output bits each flip with ~1/2 chance per input bit."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
  """n independent keys, or n Nones when dropout is off."""
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def attention_bias(mask_BxL: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Additive key mask, B x 1 x 1 x L: 0 where attended, the dtype's minimum where padded."""
  return jnp.where(mask_BxL[:, None, None, :].astype(bool), 0.0, jnp.finfo(dtype).min).astype(dtype)


def dropout_matmul(subscripts: str, probs: jax.Array, v: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """einsum(subscripts, dropout(probs), v), keeping nothing but `probs` and `v` for the backward pass.

  The backward pass recomputes the keep mask (a few integer ops per element) and the dropped
  probabilities instead of holding both, two L x L tensors per layer, until then.
  """
  if rng is None or rate == 0.0:
    return jnp.einsum(subscripts, probs, v)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def dropped(probs: jax.Array, v: jax.Array, rng: jax.Array) -> jax.Array:
    return jnp.einsum(subscripts, dropout(probs, rate, rng), v)

  return dropped(probs, v, rng)


def stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """`n` layers built by `make` as one module whose params carry a leading `layers` axis (N x ...)."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs: nnx.Rngs) -> nnx.Module:
    return make(rngs)

  layers = create(rngs)
  for _, v in nnx.iter_graph(layers):
    if isinstance(v, nnx.Param):
      v.set_metadata("axes", ("layers", *v.get_metadata()["axes"]))
  return layers


Body = Callable[[nnx.Module, Any, Any, Context], tuple[Any, Any]]


def scan(layers: nnx.Module, body: Body, carry: Any, xs: Any, ctx: Context, remat: str = "none", unroll: bool = False,
         last: Body | None = None) -> tuple[Any, Any]:
  """Runs body(layer_i, carry, xs[i], ctx_i) -> (carry, ys[i]) over a `stack`: one lax.scan, or N unrolled calls.
  `last`, when given, runs the final layer instead of `body` (after the scan of the others).

  ctx_i is `ctx` with layer i's own adapter dropout key (split from ctx's), so no two layers' adapters share masks.

  Scanned, the layer is traced once whatever the depth, so compile time does not grow with it.
  Unrolled (model.scan_layers: false), each layer is its own code: XLA then keeps no stacked
  activation buffers to zero-fill and slice, so a CPU step is faster and compiling takes longer.
  With `remat` each layer's backward pass recomputes what the policy does not save, and the layers
  always run as the scan: unrolled, nothing keeps XLA from running every layer's recomputation and
  kernel gradients wherever it likes, and on XLA:CPU remat then saved almost none of the memory it is
  for (`tests/test_scale.py`; docs/scaling.md).
  """
  graphdef, state = nnx.split(layers)
  n = jax.tree.leaves(nnx.to_pure_dict(state))[0].shape[0]
  adapter_rngs = None if ctx.adapter_rng is None else jax.random.split(ctx.adapter_rng, n)

  def stepper(run: Body) -> Callable[[Any, Any], tuple[Any, Any]]:
    def step(carry: Any, inputs: Any) -> tuple[Any, Any]:
      layer_state, x, rng = inputs
      return run(nnx.merge(graphdef, layer_state), carry, x, dataclasses.replace(ctx, adapter_rng=rng))

    if remat != "none":  # a scan body cannot be merged with its recomputation, so it needs no prevent_cse
      step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return step

  step, final = stepper(body), stepper(last or body)
  inputs = (nnx.to_pure_dict(state), xs, adapter_rngs)
  if remat != "none" or not unroll:
    if last is None:
      return jax.lax.scan(step, carry, inputs)
    carry, ys = jax.lax.scan(step, carry, jax.tree.map(lambda a: a[:-1], inputs))
    carry, y = final(carry, jax.tree.map(lambda a: a[-1], inputs))
    return carry, jax.tree.map(lambda s, y: jnp.concatenate([s, y[None]]), ys, y)
  # lax.split's transpose is a concatenate: each layer's gradient lands in its rows of the stacked one.
  split = jax.tree.map(lambda a: [part[0] for part in jax.lax.split(a, [1] * n)], inputs)
  ys = []
  for i in range(n):
    run = final if i == n - 1 else step
    carry, y = run(carry, jax.tree.map(lambda parts: parts[i], split, is_leaf=lambda t: isinstance(t, list)))
    ys.append(y)
  return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def shift_right(labels_BxT: jax.Array, decoder_start: int) -> jax.Array:
  """A teacher-forced decoder's input: decoder_start, then the labels but the last."""
  return jnp.concatenate([jnp.full_like(labels_BxT[:, :1], decoder_start), labels_BxT[:, :-1]], axis=1)
