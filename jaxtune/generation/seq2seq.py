"""Jitted generation for encoder-decoder models: greedy, sampling and beam search over a KV cache.

The source is encoded once and every decoder layer's cross-attention keys/values are computed once
(`init_cache`); each step feeds one token per row and appends its self-attention keys/values. The
rules follow transformers' `generate`: every row starts from the decoder start token; a finished
row emits padding; `forced_bos_token_id` is the first token, `forced_eos_token_id` the last one a
row reaching max_new_tokens can emit; `suppress` tokens (single-token `bad_words_ids`) are never emitted. Beam
search is transformers' own (static shapes, top 2k continuations per step, length penalty on the
generated length, early stopping True / False / "never"), so its choices match token for token.
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
from flax import nnx

from jaxtune.config import GenerateConfig, ModelConfig
from jaxtune.generation import decoder as decoder_generate
from jaxtune.models import encdec
from jaxtune.models.model import Model
from jaxtune.weights import hf

NEG = -1.0e9  # transformers' "never" score in beam search


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


@dataclasses.dataclass(frozen=True)
class Search:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy (or beam search with num_beams > 1)
  top_p: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0  # beam scores are log-probability sums / generated length ** length_penalty
  early_stopping: bool | str = False  # True: stop once num_beams hypotheses finish; "never": the canonical search

  @classmethod
  def from_config(cls, g: GenerateConfig) -> Search:
    return cls(g.max_new_tokens, g.temperature, g.top_p, g.num_beams, g.length_penalty, g.early_stopping)


def _process(logits_BxV: jax.Array, step: jax.Array, r: Rules, s: Search) -> jax.Array:
  """transformers' logits processors for these rules at new-token index `step` (scores, -inf where forbidden)."""
  vocab = jnp.arange(logits_BxV.shape[-1])
  if r.suppress:
    logits_BxV = jnp.where(jnp.isin(vocab, jnp.asarray(r.suppress)), -jnp.inf, logits_BxV)
  for token, at in ((r.forced_bos, 0), (r.forced_eos, s.max_new_tokens - 1)):
    if token is not None:
      logits_BxV = jnp.where((step == at) & (vocab != token), -jnp.inf, logits_BxV)
  return logits_BxV


def _start(module: nnx.Module, batch: dict[str, jax.Array], beams: int, s: Search, dtype: Any) -> encdec.Cache:
  memory = module.encode(batch, dtype)
  mask = batch["attention_mask"]
  if beams > 1:  # beam j of source i is row i * beams + j
    memory, mask = jnp.repeat(memory, beams, 0), jnp.repeat(mask, beams, 0)
  return module.init_cache(memory, mask, s.max_new_tokens, dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "r", "s", "dtype"))
def _sample(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], rng: jax.Array, r: Rules, s: Search,
            dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Greedy or sampled decoding: (tokens B x N, lengths B)."""
  module = nnx.merge(graphdef, params)
  b = batch["input_ids"].shape[0]
  eos = jnp.asarray(r.eos_ids)
  sampling = decoder_generate.Sampling(s.max_new_tokens, s.temperature, s.top_p)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < s.max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, tokens_BxN, done_B, lengths_B, rng = carry
    last = jnp.where(i == 0, r.decoder_start, jax.lax.dynamic_slice_in_dim(tokens_BxN, jnp.maximum(i - 1, 0), 1, 1))
    logits, cache = module.decode_step(jnp.broadcast_to(last, (b, 1)), cache, dtype)
    rng, step_rng = jax.random.split(rng)
    token_B = decoder_generate.sample(_process(logits[:, -1], i, r, s), step_rng, sampling)
    token_B = jnp.where(done_B, r.pad_id, token_B)
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], i, 1)
    lengths_B = jnp.where(done_B, lengths_B, i + 1)
    return i + 1, cache, tokens_BxN, done_B | jnp.isin(token_B, eos), lengths_B, rng

  tokens = jnp.full((b, s.max_new_tokens), r.pad_id, jnp.int32)
  carry = (jnp.int32(0), _start(module, batch, 1, s, dtype), tokens, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32), rng)
  _, _, tokens, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, lengths


def _take(x: jax.Array, index_BxJ: jax.Array) -> jax.Array:
  """x[b, index[b, j], ...] for x of B x k x ... (transformers' _gather_beams)."""
  index = index_BxJ.reshape(index_BxJ.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "r", "s", "dtype"))
def _beam_search(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], r: Rules, s: Search,
                 dtype: Any) -> tuple[jax.Array, jax.Array]:
  """transformers' beam search: (best hypothesis B x N, its length B)."""
  module = nnx.merge(graphdef, params)
  b, k, n = batch["input_ids"].shape[0], s.num_beams, s.max_new_tokens
  top = max(2, 1 + len(r.eos_ids)) * k  # continuations kept per step: enough to leave k unfinished
  in_top_k = jnp.arange(top) < k
  eos = jnp.asarray(r.eos_ids)
  never, lp = s.early_stopping == "never", s.length_penalty
  stop_when_full = s.early_stopping is True

  def cond(carry):
    i, go = carry[0], carry[1]
    return (i < n) & go

  def body(carry):
    i, _, cache, run_tokens, run_scores, tokens, scores, lengths, finished, open_B1 = carry
    last = jnp.where(i == 0, r.decoder_start, jax.lax.dynamic_slice_in_dim(run_tokens, jnp.maximum(i - 1, 0), 1, 2))
    logits, cache = module.decode_step(jnp.broadcast_to(last, (b, k, 1)).reshape(b * k, 1), cache, dtype)
    logp = _process(jax.nn.log_softmax(logits[:, -1]), i, r, s)
    v = logp.shape[-1]
    logp = (logp.reshape(b, k, v) + run_scores[:, :, None]).reshape(b, k * v)
    # The best `top` continuations over all beams.
    top_logp, top_index = jax.lax.top_k(logp, top)
    from_beam, token = top_index // v, top_index % v
    top_tokens = _take(run_tokens, from_beam).at[:, :, i].set(token)
    hits = jnp.isin(token, eos) | (i + 1 >= n)  # ends here: EOS, or the length limit
    # The k best that go on.
    going = top_logp + hits * NEG
    keep = jax.lax.top_k(going, k)[1]
    run_tokens, run_scores = _take(top_tokens, keep), _take(going, keep)
    cache = encdec.reorder(cache, (jnp.arange(b)[:, None] * k + _take(from_beam, keep)).reshape(-1))
    # Finished hypotheses: the k best of those kept and those ending here among the top k.
    ended = hits & in_top_k
    score = top_logp / (i + 1.0) ** lp
    score = score + (jnp.all(finished, -1, keepdims=True) & stop_when_full) * NEG + (~open_B1) * NEG + (~ended) * NEG
    merged = jax.lax.top_k(jnp.concatenate([scores, score], 1), k)[1]
    tokens = _take(jnp.concatenate([tokens, top_tokens], 1), merged)
    scores = _take(jnp.concatenate([scores, score], 1), merged)
    lengths = _take(jnp.concatenate([lengths, jnp.full((b, top), i + 1)], 1), merged)
    finished = _take(jnp.concatenate([finished, ended], 1), merged)
    # Can a running beam still beat the worst finished one? (transformers' heuristic)
    best_length = n if (never and lp > 0) else i + 1
    best_running = run_scores[:, :1] / best_length ** lp
    worst = jnp.where(finished, jnp.min(scores, 1, keepdims=True), NEG)
    open_B1 = open_B1 & jnp.any(best_running > worst, -1, keepdims=True)
    go = jnp.any(open_B1) & ~(jnp.all(finished) & stop_when_full) & ~jnp.all(hits)
    return i + 1, go, cache, run_tokens, run_scores, tokens, scores, lengths, finished, open_B1

  run_tokens = jnp.full((b, k, n), r.pad_id, jnp.int32)
  run_scores = jnp.zeros((b, k)).at[:, 1:].set(NEG)  # only the first beam extends at the first step
  carry = (jnp.int32(0), jnp.bool_(True), _start(module, batch, k, s, dtype), run_tokens, run_scores, run_tokens,
           jnp.full((b, k), NEG), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool), jnp.ones((b, 1), bool))
  out = jax.lax.while_loop(cond, body, carry)
  return out[5][:, 0], out[7][:, 0]


def right_pad(sources: Sequence[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """Sources as one right-padded batch (input_ids, attention_mask), padded to a multiple of the decoder-only
  generation's PAD_MULTIPLE so that few distinct shapes get compiled."""
  multiple = decoder_generate.PAD_MULTIPLE
  length = -(-max(len(x) for x in sources) // multiple) * multiple
  ids = np.full((len(sources), length), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, x in enumerate(sources):
    ids[i, :len(x)], mask[i, :len(x)] = x, 1
  return {"input_ids": ids, "attention_mask": mask}


def generate(model: Model, params: Any, sources: Sequence[np.ndarray], rules: Rules,
             s: Search = Search(), rng: jax.Array | None = None, dtype: Any = jnp.float32) -> list[np.ndarray]:
  """The generated target tokens of each source (without the decoder start token, up to and with EOS)."""
  if s.num_beams > 1 and s.temperature > 0:
    raise ValueError("beam search here is deterministic; use num_beams 1 to sample")
  batch = {k: jnp.asarray(v) for k, v in right_pad(sources, rules.pad_id).items()}
  if s.num_beams > 1:
    tokens, lengths = _beam_search(model.graphdef, params, batch, rules, s, jnp.dtype(dtype))
  else:
    rng = jax.random.key(0) if rng is None else rng
    tokens, lengths = _sample(model.graphdef, params, batch, rng, rules, s, jnp.dtype(dtype))
  return [row[:length] for row, length in zip(np.asarray(tokens), np.asarray(lengths))]
