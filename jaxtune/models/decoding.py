"""Decoder attention shared by the causal LMs: segment + causal masks and the KV cache.

A row may pack several documents: `segment_ids` number them (0 = padding) and `positions` restart
at 0 in each. A query attends to keys of its own segment at positions <= its own, which is causal
attention that never crosses a document boundary. Dimensions: B batch, L new tokens, S cache
slots, N layers, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtune.models import cpu_attention, layers


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
           kv: tuple[jax.Array, jax.Array], dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Grouped-query attention under the segment-causal mask; K/V heads are shared, never repeated.

  With `rng` and a non-zero rate the attention probabilities are dropped out (as HF does in training),
  which needs them spelled out, as does a CPU, where XLA's dot_product_attention lays the products out
  transposed; otherwise XLA's fused dot_product_attention runs, or on one CPU device without a cache
  jaxtune's own kernel (cpu_attention.py).
  """
  kv_seg_BxS, kv_pos_BxS = kv
  dropout = rng is not None and dropout_rate > 0.0
  if not dropout and segments.start is None and cpu_attention.takes(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK):
    return cpu_attention.attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, kv_seg_BxS, kv_pos_BxS)
  same_doc = segments.q_segments[:, :, None] == kv_seg_BxS[:, None, :]
  causal = kv_pos_BxS[:, None, :] <= segments.q_positions[:, :, None]
  mask_BxLxS = same_doc & causal & (kv_seg_BxS[:, None, :] > 0)
  k_BxSxGxK, v_BxSxGxK = k_BxSxGxK.astype(q_BxLxHxK.dtype), v_BxSxGxK.astype(q_BxLxHxK.dtype)
  if not dropout and jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_BxLxS[:, None])
  b, length, h, k = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  # Heads in front of the length, so both products are batched matmuls over each operand's minor dim;
  # R = H / G query heads share each kv head.
  q_BxGxRxLxK = q_BxLxHxK.reshape(b, length, g, h // g, k).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK, v_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)
  blocks = _query_blocks(length) if segments.start is None else [(0, length, k_BxSxGxK.shape[1])]
  rngs = [rng] if len(blocks) == 1 else layers.split_rng(rng if dropout else None, len(blocks))
  ctx = []
  for (q0, q1, s1), r in zip(blocks, rngs):  # without a cache, query i never sees a key beyond i
    ctx.append(_attend_block(q_BxGxRxLxK[:, :, :, q0:q1], k_BxGxSxK[:, :, :s1], v_BxGxSxK[:, :, :s1],
                             mask_BxLxS[:, q0:q1, :s1], dropout_rate, r))
  ctx_BxGxRxLxK = ctx[0] if len(ctx) == 1 else jnp.concatenate(ctx, axis=3)
  return ctx_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, length, h, k)


QUERY_BLOCK = 128  # queries per block of causal attention without a cache


def _query_blocks(length: int) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) per block of queries; each block's keys end where its queries do.

  Without a cache, keys and queries are the same tokens in the same order, and a key after query i is
  either later in i's document (causal) or in another document: masked either way. Block j of n
  attends to the first j + 1 blocks of keys, so the scores, softmax and both products skip the masked
  upper right of the L x L square: 3/4 of the work for two blocks.
  """
  return [(q0, min(q0 + QUERY_BLOCK, length), min(q0 + QUERY_BLOCK, length)) for q0 in range(0, length, QUERY_BLOCK)]


def _attend_block(q_BxGxRxLxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array, mask_BxLxS: jax.Array,
                  dropout_rate: float, rng: jax.Array | None) -> jax.Array:
  """Softmax attention of one block of queries (float32 scores) over its keys: B x G x R x L x K."""
  k = q_BxGxRxLxK.shape[-1]
  scores_BxGxRxLxS = jnp.einsum("bgrlk,bgsk->bgrls", q_BxGxRxLxK, k_BxGxSxK).astype(jnp.float32) / math.sqrt(k)
  scores_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
  probs_BxGxRxLxS = jax.nn.softmax(scores_BxGxRxLxS, -1).astype(q_BxGxRxLxK.dtype)
  return layers.dropout_matmul("bgrls,bgsk->bgrlk", probs_BxGxRxLxS, v_BxGxSxK, dropout_rate, rng)


def advance(cache: Cache | None, segments: Segments) -> Cache | None:
  """The cache after the new tokens: their segments/positions recorded, length moved on."""
  if cache is None:
    return None
  return cache._replace(segment_ids=segments.kv_segments, positions=segments.kv_positions,
                        length=cache.length + segments.q_segments.shape[1])
