"""Jitted text generation with a KV cache: greedy or temperature / top-p sampling, stopping on EOS.

Prompts are left-padded to one length so that every row's next token goes to the same cache slot;
padding has segment 0, which the attention mask never attends to. Dimensions: B batch, P prompt
length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.models.model import Model


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0 = greedy (argmax)
  top_p: float = 1.0  # nucleus: sample from the smallest set of tokens with this much probability


PAD_MULTIPLE = 32  # prompt batches pad to a multiple of this, so few distinct shapes get compiled


def left_pad(prompts: Sequence[np.ndarray], length: int | None = None) -> dict[str, np.ndarray]:
  """Prompts as one left-padded batch: input_ids, segment_ids (1 real, 0 pad), positions."""
  longest = max(len(p) for p in prompts)
  length = length or -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
  ids = np.zeros((len(prompts), length), np.int32)
  seg = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = p
    seg[i, length - len(p):] = 1
  return {"input_ids": ids, "segment_ids": seg, "positions": np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)}


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
  """The next token per row: argmax at temperature 0, else a top-p filtered categorical draw."""
  if s.temperature == 0.0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  probs_BxV = jax.nn.softmax(logits_BxV / s.temperature, -1)
  sorted_BxV = jnp.sort(probs_BxV, -1)[:, ::-1]
  # The smallest probability still inside the nucleus; ties at the cut stay in.
  inside_BxV = jnp.cumsum(sorted_BxV, -1) - sorted_BxV < s.top_p
  cutoff_B = jnp.min(jnp.where(inside_BxV, sorted_BxV, 1.0), -1)
  masked_BxV = jnp.where(probs_BxV >= cutoff_B[:, None], jnp.log(probs_BxV), -jnp.inf)
  return jax.random.categorical(rng, masked_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "s", "dtype"))
def _generate(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], eos_ids: jax.Array,
              rng: jax.Array, s: Sampling, dtype: Any) -> jax.Array:
  module = nnx.merge(graphdef, params)
  b, p = batch["input_ids"].shape
  cache = module.init_cache(b, p + s.max_new_tokens, dtype)
  out = module(batch, dtype=dtype, cache=cache)
  rng, first_rng = jax.random.split(rng)
  token_B = sample(out["logits"][:, -1], first_rng, s)
  tokens_BxN = jnp.zeros((b, s.max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, eos_ids)
  next_pos_B = batch["positions"][:, -1] + 1

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < s.max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, tokens_BxN, done_B, pos_B, rng = carry
    step = {"input_ids": jax.lax.dynamic_slice_in_dim(tokens_BxN, i - 1, 1, 1),
            "segment_ids": jnp.ones((b, 1), jnp.int32), "positions": pos_B[:, None]}
    out = module(step, dtype=dtype, cache=cache)
    rng, step_rng = jax.random.split(rng)
    token_B = sample(out["logits"][:, -1], step_rng, s)
    token_B = jnp.where(done_B, eos_ids[0], token_B)  # finished rows keep emitting EOS
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], i, 1)
    return i + 1, out["cache"], tokens_BxN, done_B | jnp.isin(token_B, eos_ids), pos_B + 1, rng

  carry = (jnp.int32(1), out["cache"], tokens_BxN, done_B, next_pos_B, rng)
  return jax.lax.while_loop(cond, body, carry)[2]


def generate(model: Model, params: Any, prompts: Sequence[np.ndarray], eos_ids: Sequence[int],
             s: Sampling = Sampling(), rng: jax.Array | None = None, dtype: Any = jnp.float32) -> list[np.ndarray]:
  """New tokens for each prompt, cut after the first EOS (which is kept)."""
  batch = {k: jnp.asarray(v) for k, v in left_pad(prompts).items()}
  rng = jax.random.key(0) if rng is None else rng
  eos = jnp.asarray(eos_ids, jnp.int32)
  tokens_BxN = np.asarray(_generate(model.graphdef, params, batch, eos, rng, s, jnp.dtype(dtype)))
  return [row[:_first_eos(row, eos_ids) + 1] for row in tokens_BxN]


def _first_eos(row: np.ndarray, eos_ids: Sequence[int]) -> int:
  hits = np.flatnonzero(np.isin(row, eos_ids))
  return int(hits[0]) if len(hits) else len(row) - 1
