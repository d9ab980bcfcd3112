"""What the encoder-decoder models (T5, BART, Marian) share: their attention, running a layer stack, and the
decoding cache.

Generation encodes the source once. `init_cache` then projects the encoder output through every
decoder layer's cross-attention keys and values, which stay fixed, and leaves room for T decoder
self-attention keys and values, written one step at a time from slot `length`. Every row of a
batch decodes in step (all start from the decoder start token), so one `length` serves them all.
Dimensions: N decoder layers, B batch, S source length, T decoder slots, L new tokens, H heads, K head dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import attention, layers

HEADS = ("batch", "length", "heads", "head_dim")


class Attention(nnx.Module):
  """Multi-head attention with q, k, v and o projections, softmax in float32 and dropout on the probabilities.

  T5 and BART differ only in the arguments: T5 has no biases and no 1/sqrt(K) on the logits (folded into its
  init: `scale` None), BART and Marian have biases and scale by K**-0.5.
  """

  def __init__(self, d: int, heads: int, head_dim: int, *, use_bias: bool, scale: float | None, rate: float,
               rngs: nnx.Rngs):
    dense = lambda i, o, ia, oa: layers.Dense(i, o, ia, oa, rngs=rngs, use_bias=use_bias)
    self.q = dense((d,), (heads, head_dim), ("embed",), ("heads", "head_dim"))
    self.k = dense((d,), (heads, head_dim), ("embed",), ("heads", "head_dim"))
    self.v = dense((d,), (heads, head_dim), ("embed",), ("heads", "head_dim"))
    self.o = dense((heads, head_dim), (d,), ("heads", "head_dim"), ("embed",))
    self.scale, self.rate = scale, rate

  def kv(self, x_BxSxD: jax.Array, ctx: layers.Context) -> tuple[jax.Array, jax.Array]:
    """Keys and values (each B x S x H x K) of the tokens attended to."""
    return tuple(ctx.constrain(y, HEADS) for y in layers.dense_many((self.k, self.v), x_BxSxD, ctx))

  def __call__(self, x_BxTxD: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, mask: attention.Mask,
               rng: jax.Array | None, ctx: layers.Context) -> jax.Array:
    """Attention of x over keys and values (`kv` of x itself for self-attention) under `mask` (padding, causal,
    and T5's relative positions as its bias)."""
    q = ctx.constrain(self.q(x_BxTxD, ctx), HEADS)
    scale = 1.0 if self.scale is None else self.scale
    return self.o(attention.attend(q, k_BxSxHxK, v_BxSxHxK, ctx, mask, scale, self.rate, rng), ctx)


class LayerCache(NamedTuple):
  self_k: jax.Array  # B x T x H x K (N x ... for all layers, stacked like the layer params)
  self_v: jax.Array
  cross_k: jax.Array  # B x S x H x K, the encoder output's
  cross_v: jax.Array


class Cache(NamedTuple):
  layers: LayerCache
  memory_mask: jax.Array  # B x S, 1 for real source tokens
  length: jax.Array  # int32 scalar: decoder slots filled so far


def new_cache(cross_kv: tuple[jax.Array, jax.Array], memory_mask_BxS: jax.Array, slots: int,
              dtype: jnp.dtype) -> Cache:
  """Empty self-attention slots next to the layers' cross-attention keys/values (each N x B x S x H x K)."""
  cross_k, cross_v = cross_kv
  n, b, _, h, k = cross_k.shape
  zeros = jnp.zeros((n, b, slots, h, k), dtype)
  return Cache(LayerCache(zeros, zeros, cross_k.astype(dtype), cross_v.astype(dtype)), memory_mask_BxS,
               jnp.zeros((), jnp.int32))


def write(layer: LayerCache, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, start: jax.Array) -> LayerCache:
  """The layer's cache with the new tokens' self-attention keys and values written from slot `start`."""
  at = (0, start, 0, 0)
  return layer._replace(self_k=jax.lax.dynamic_update_slice(layer.self_k, k_BxLxHxK.astype(layer.self_k.dtype), at),
                        self_v=jax.lax.dynamic_update_slice(layer.self_v, v_BxLxHxK.astype(layer.self_v.dtype), at))


def cache_mask(q_positions_L: jax.Array, k_positions_T: jax.Array, bias: jax.Array | None = None) -> attention.Mask:
  """A decoding step's self-attention: a query sees the cache slots at its own position and before."""
  seen = k_positions_T[None, :] <= q_positions_L[:, None]
  causal = jnp.where(seen, 0.0, jnp.finfo(jnp.float32).min)[None, None]
  return attention.Mask(bias=causal if bias is None else bias + causal)


def reorder(cache: Cache, rows_B: jax.Array) -> Cache:
  """The cache of rows `rows_B` (beam search keeps the beams it extends)."""
  layers = jax.tree.map(lambda a: a[:, rows_B], cache.layers)  # N x B x ...
  return Cache(layers, cache.memory_mask[rows_B], cache.length)


def self_attention(attn: Attention, x_BxTxD: jax.Array, mask: attention.Mask, rng: jax.Array | None,
                   ctx: layers.Context, cache: LayerCache | None,
                   start: jax.Array | None) -> tuple[jax.Array, LayerCache | None]:
  """A decoder's self-attention over x; with a layer `cache`, x's keys and values are written at `start` and
  the attention reads every cached slot (`mask` hides the empty ones)."""
  k, v = attn.kv(x_BxTxD, ctx)
  if cache is not None:
    cache = write(cache, k, v, start)
    k, v = cache.self_k, cache.self_v
  return attn(x_BxTxD, k, v, mask, rng, ctx), cache


def cross_attention(attn: Attention, x_BxTxD: jax.Array, memory_BxSxD: jax.Array | None, mask: attention.Mask,
                    rng: jax.Array | None, ctx: layers.Context, cache: LayerCache | None) -> jax.Array:
  """A decoder's attention over the encoder output, whose keys and values a `cache` already holds."""
  k, v = attn.kv(memory_BxSxD, ctx) if cache is None else (cache.cross_k, cache.cross_v)
  return attn(x_BxTxD, k, v, mask, rng, ctx)


def run_stack(stack: nnx.Module, x_BxTxD: jax.Array, memory_BxSxD: jax.Array | None, self_mask: attention.Mask,
              cross_mask: attention.Mask | None, rngs: jax.Array | None, remat: str, scan_layers: bool,
              ctx: layers.Context) -> jax.Array:
  """Every layer of an encoder stack (memory None: layer(x, self_mask, rng, ctx)) or a decoder stack (layer(x,
  memory, self_mask, cross_mask, rng, ctx)), each with its own dropout key of `rngs` (N keys, or None)."""

  def body(layer: nnx.Module, x: jax.Array, rng: jax.Array | None, ctx: layers.Context) -> tuple[jax.Array, None]:
    x = ctx.constrain(x, ("batch", "length", "embed"))
    if memory_BxSxD is None:
      return layer(x, self_mask, rng, ctx), None
    return layer(x, memory_BxSxD, self_mask, cross_mask, rng, ctx), None

  return layers.scan(stack, body, x_BxTxD, rngs, ctx, remat, unroll=not scan_layers)[0]


def cross_kv(stack: nnx.Module, memory_BxSxD: jax.Array, scan_layers: bool,
             ctx: layers.Context) -> tuple[jax.Array, jax.Array]:
  """Every decoder layer's cross-attention keys and values of the encoder output (each N x B x S x H x K)."""
  _, kv = layers.scan(stack, lambda layer, c, _, ctx: (c, layer.cross_attn.kv(memory_BxSxD, ctx)), None, None, ctx,
                      unroll=not scan_layers)
  return kv


def step_stack(stack: nnx.Module, x_BxLxD: jax.Array, self_mask: attention.Mask, cache: Cache, scan_layers: bool,
               ctx: layers.Context) -> tuple[jax.Array, Cache]:
  """The decoder layers on L new tokens: each reads and extends its cache from slot cache.length."""
  cross_mask = attention.Mask(kv_segments=cache.memory_mask)

  def body(layer: nnx.Module, x: jax.Array, layer_cache: LayerCache, ctx: layers.Context) -> tuple[jax.Array, Any]:
    return layer(x, None, self_mask, cross_mask, None, ctx, layer_cache, cache.length)

  x, layer_caches = layers.scan(stack, body, x_BxLxD, cache.layers, ctx, unroll=not scan_layers)
  return x, cache._replace(layers=layer_caches, length=cache.length + x_BxLxD.shape[1])
