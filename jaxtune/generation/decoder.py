"""Jitted text generation for decoder-only models with a KV cache: greedy or temperature / top-p sampling.

Prompts are left-padded to one length so that every row's next token goes to the same cache slot;
padding has segment 0, which the attention mask never attends to. The prompt fills the cache in one
call; search.py's loop then feeds one new token per row until each has emitted an EOS (or N tokens).
Dimensions: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import UserError
from jaxtune.generation import search
from jaxtune.models import decoding
from jaxtune.models.model import Model
from jaxtune.params import Params

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


@functools.partial(jax.jit, static_argnames=("model", "eos", "s", "dtype"))
def _generate(model: Model, params: Params, batch: dict[str, jax.Array], eos: tuple[int, ...], rng: jax.Array,
              s: search.Search, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """(tokens B x N, lengths B) continuing every prompt of the batch."""
  b, p = batch["input_ids"].shape
  cache = model.apply(params, b, p + s.max_new_tokens, dtype, method="init_cache")
  out = model.apply(params, batch, dtype=dtype, cache=cache)
  last_position_B = batch["positions"][:, -1]

  def step(tokens_B: jax.Array, i: jax.Array, cache: decoding.Cache) -> tuple[jax.Array, decoding.Cache]:
    new = {"input_ids": tokens_B[:, None], "segment_ids": jnp.ones((b, 1), jnp.int32),
           "positions": (last_position_B + i)[:, None]}
    out = model.apply(params, new, dtype=dtype, cache=cache)
    return out["logits"][:, -1], out["cache"]

  return search.sample_loop(out["logits"][:, -1], out["cache"], step, eos, eos[0], rng, s)


def generate(model: Model, params: Params, prompts: Sequence[np.ndarray], eos_ids: Sequence[int],
             s: search.Search = search.GREEDY, rng: jax.Array | None = None,
             dtype: Any = jnp.float32) -> list[np.ndarray]:
  """New tokens for each prompt, cut after the first EOS (which is kept)."""
  if s.num_beams > 1:
    raise UserError("beam search (generate.num_beams > 1) is for seq2seq models; decoders sample or decode greedily.")
  batch = {k: jnp.asarray(v) for k, v in left_pad(prompts).items()}
  rng = jax.random.key(0) if rng is None else rng
  tokens, lengths = _generate(model, params, batch, tuple(int(e) for e in eos_ids), rng, s, jnp.dtype(dtype))
  return [row[:length] for row, length in zip(np.asarray(tokens), np.asarray(lengths))]
