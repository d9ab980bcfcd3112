"""Decoder attention shared by the causal LMs: segment + causal masks and the KV cache.

A row may pack several documents: `segment_ids` number them (0 = padding) and `positions` restart
at 0 in each. A query attends to keys of its own segment at positions <= its own, which is causal
attention that never crosses a document boundary. Dimensions: B batch, L new tokens, S cache
slots, N layers, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtune.models import attention, layers


class LayerCache(NamedTuple):
  k: jax.Array  # B x S x G x K (N x B x S x G x K for all layers)
  v: jax.Array


class Cache(NamedTuple):
  layers: LayerCache  # every layer's, stacked on a leading N axis like the layer params
  segment_ids: jax.Array  # B x S, 0 for empty slots and padding
  positions: jax.Array  # B x S
  length: jax.Array  # int32 scalar: slots filled so far (new tokens are written from here)


class Segments(NamedTuple):
  """Who the new tokens are and, with a cache, who every key slot is after writing them."""
  q_segments: jax.Array  # B x L
  q_positions: jax.Array  # B x L
  kv_segments: jax.Array  # B x S (B x L without a cache)
  kv_positions: jax.Array
  start: jax.Array | None  # where the new tokens go in the cache

  @staticmethod
  def of(batch: dict[str, jax.Array], cache: Cache | None) -> Segments:
    seg, pos = batch["segment_ids"], batch["positions"]
    if cache is None:
      return Segments(seg, pos, seg, pos, None)
    at = (0, cache.length)
    return Segments(seg, pos, jax.lax.dynamic_update_slice(cache.segment_ids, seg, at),
                    jax.lax.dynamic_update_slice(cache.positions, pos, at), cache.length)


def init_cache(batch: int, slots: int, num_layers: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> Cache:
  """An empty cache of `slots` positions per row."""
  zeros = jnp.zeros((num_layers, batch, slots, kv_heads, head_dim), dtype)
  return Cache(LayerCache(zeros, zeros), jnp.zeros((batch, slots), jnp.int32),
               jnp.zeros((batch, slots), jnp.int32), jnp.zeros((), jnp.int32))


def extend(cache: LayerCache | None, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, segments: Segments):
  """(keys, values, (kv segments, kv positions), new layer cache) after writing the new tokens."""
  kv = (segments.kv_segments, segments.kv_positions)
  if cache is None:
    return k_BxLxGxK, v_BxLxGxK, kv, None
  at = (0, segments.start, 0, 0)
  k_BxSxGxK = jax.lax.dynamic_update_slice(cache.k, k_BxLxGxK.astype(cache.k.dtype), at)
  v_BxSxGxK = jax.lax.dynamic_update_slice(cache.v, v_BxLxGxK.astype(cache.v.dtype), at)
  return k_BxSxGxK, v_BxSxGxK, kv, LayerCache(k_BxSxGxK, v_BxSxGxK)


def attend(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, segments: Segments,
           kv: tuple[jax.Array, jax.Array], ctx: layers.Context, dropout_rate: float = 0.0,
           rng: jax.Array | None = None, window: int | None = None, local: jax.Array | None = None,
           scale: float | None = None, soft_cap: float | None = None) -> jax.Array:
  """Grouped-query attention under the segment-causal mask (attention.attend picks the kernel).

  Without a cache, keys are the queries' own tokens in order and positions restart at 0 in each segment,
  so causal by position is causal by index: the fused kernels' causal mask plus segment ids. `window`: sliding-window
  attention (Mistral), a query sees its own position and the window - 1 before it; only where the traced bool
  `local` holds, when given (a layer of a stack that mixes windowed and full layers: Gemma, some Qwen2).
  """
  kv_seg_BxS, kv_pos_BxS = kv
  mask = attention.Mask(q_segments=segments.q_segments, kv_segments=kv_seg_BxS, causal=True,
                        q_positions=segments.q_positions, kv_positions=kv_pos_BxS, window=window, local=local,
                        in_order=segments.start is None)
  return attention.attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, ctx, mask, scale, dropout_rate, rng, soft_cap)


def advance(cache: Cache | None, segments: Segments) -> Cache | None:
  """The cache after the new tokens: their segments/positions recorded, length moved on."""
  if cache is None:
    return None
  return cache._replace(segment_ids=segments.kv_segments, positions=segments.kv_positions,
                        length=cache.length + segments.q_segments.shape[1])
