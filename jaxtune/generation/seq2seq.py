"""Jitted generation for encoder-decoder models (T5, BART, Marian): greedy, sampling and beam search over a KV cache.

The source is encoded once and every decoder layer's cross-attention keys/values are computed once
(`init_cache`); each step feeds one token per row and appends its self-attention keys/values. The
search loops are search.py's; what is the encoder-decoder's own follows transformers' `generate`:
every row starts from the decoder start token; a finished row emits padding; `forced_bos_token_id`
is the first token, `forced_eos_token_id` the last one a row reaching max_new_tokens can emit;
`suppress` tokens (single-token `bad_words_ids`) are never emitted.
Dimensions: B sources, k beams, N max new tokens, V vocab, S source length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import ModelConfig
from jaxtune.generation import decoder, search
from jaxtune.models import encdec
from jaxtune.models.model import Model
from jaxtune.params import Params
from jaxtune.weights import hf


@dataclasses.dataclass(frozen=True)
class Rules:
  """The model's special tokens for generation (config.json / generation_config.json)."""
  decoder_start: int
  eos_ids: tuple[int, ...]
  pad_id: int
  forced_bos: int | None = None
  forced_eos: int | None = None
  suppress: tuple[int, ...] = ()

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> Rules:
    """Rules from an HF config with generation_config.json's keys merged in (OPUS-MT's bans its pad token there)."""
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    pad = hf.get("pad_token_id")
    pad = eos_ids[0] if pad is None else pad
    bad = [ids[0] for ids in hf.get("bad_words_ids") or () if len(ids) == 1]
    bad += hf.get("suppress_tokens") or []
    start = hf.get("decoder_start_token_id")
    return cls(pad if start is None else start, eos_ids, pad, hf.get("forced_bos_token_id"),
               hf.get("forced_eos_token_id"), tuple(sorted(set(bad))))


def rules_for(model: Model, model_cfg: ModelConfig) -> Rules:
  """The rules of a loaded model: its config.json with the checkpoint's generation_config.json over it."""
  model_dir = hf.resolve_path(model_cfg.path)
  generation = model_dir / "generation_config.json"
  extra = json.loads(generation.read_text()) if model_dir.is_dir() and generation.is_file() else {}
  return Rules.from_hf({**model.hf_config, **extra})


def _process(logits_BxV: jax.Array, step: jax.Array, r: Rules, s: search.Search) -> jax.Array:
  """transformers' logits processors for these rules at new-token index `step` (scores, -inf where forbidden)."""
  vocab = jnp.arange(logits_BxV.shape[-1])
  if r.suppress:
    logits_BxV = jnp.where(jnp.isin(vocab, jnp.asarray(r.suppress)), -jnp.inf, logits_BxV)
  for token, at in ((r.forced_bos, 0), (r.forced_eos, s.max_new_tokens - 1)):
    if token is not None:
      logits_BxV = jnp.where((step == at) & (vocab != token), -jnp.inf, logits_BxV)
  return logits_BxV


@functools.partial(jax.jit, static_argnames=("model", "r", "s", "dtype"))
def _generate(model: Model, params: Params, batch: dict[str, jax.Array], rng: jax.Array, r: Rules, s: search.Search,
              dtype: Any) -> tuple[jax.Array, jax.Array]:
  """(tokens B x N, lengths B) of greedy, sampled or beam-searched targets for a batch of sources."""
  k = s.num_beams
  memory = model.apply(params, batch, dtype, method="encode")
  mask = batch["attention_mask"]
  if k > 1:  # beam j of source i is row i * k + j
    memory, mask = jnp.repeat(memory, k, 0), jnp.repeat(mask, k, 0)
  cache = model.apply(params, memory, mask, s.max_new_tokens, dtype, method="init_cache")

  def step(tokens_B: jax.Array, i: jax.Array, cache: encdec.Cache) -> tuple[jax.Array, encdec.Cache]:
    del i  # the cache knows the position
    logits_BxLxV, cache = model.apply(params, tokens_B[:, None], cache, dtype, method="decode_step")
    return logits_BxLxV[:, -1], cache

  first, cache = step(jnp.full(memory.shape[0], r.decoder_start, jnp.int32), jnp.int32(0), cache)
  process = functools.partial(_process, r=r, s=s)
  if k > 1:
    return search.beam_search(first, cache, step, encdec.reorder, r.eos_ids, r.pad_id, s, process)
  return search.sample_loop(first, cache, step, r.eos_ids, r.pad_id, rng, s, process)


def right_pad(sources: Sequence[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """Sources as one right-padded batch (input_ids, attention_mask), padded to a multiple of the decoder-only
  generation's PAD_MULTIPLE so that few distinct shapes get compiled."""
  multiple = decoder.PAD_MULTIPLE
  length = -(-max(len(x) for x in sources) // multiple) * multiple
  ids = np.full((len(sources), length), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, x in enumerate(sources):
    ids[i, :len(x)], mask[i, :len(x)] = x, 1
  return {"input_ids": ids, "attention_mask": mask}


def generate(model: Model, params: Params, sources: Sequence[np.ndarray], rules: Rules,
             s: search.Search = search.GREEDY, rng: jax.Array | None = None,
             dtype: Any = jnp.float32) -> list[np.ndarray]:
  """The generated target tokens of each source (without the decoder start token, up to and with EOS)."""
  if s.num_beams > 1 and s.temperature > 0:
    raise ValueError("beam search here is deterministic; use num_beams 1 to sample")
  batch = {k: jnp.asarray(v) for k, v in right_pad(sources, rules.pad_id).items()}
  rng = jax.random.key(0) if rng is None else rng
  tokens, lengths = _generate(model, params, batch, rng, rules, s, jnp.dtype(dtype))
  return [row[:length] for row, length in zip(np.asarray(tokens), np.asarray(lengths))]
