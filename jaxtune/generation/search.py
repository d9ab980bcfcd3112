"""The search loops of generation: greedy or top-p sampling, and beam search, over any model's next-token logits.

A loop knows nothing of the model. It starts from the logits of the first new token and asks
`step(tokens_B, i, cache) -> (logits_BxV, cache)` for the logits after new token i - 1; decoder-only
and encoder-decoder generation (decoder.py, seq2seq.py) differ only in that function, in the first
logits (the prompt's last position, or the decoder start token's) and in `process` (forced and banned
tokens). A row stops at an EOS or after N tokens and then emits `fill`. Beam search is transformers'
own (static shapes, top 2k continuations per step, length penalty on the generated length, early
stopping True / False / "never"), so its choices match token for token.
Dimensions: B rows, k beams, N max new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.config import GenerateConfig

NEG = -1.0e9  # transformers' "never" score in beam search
Step = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]  # (tokens B, new-token index, cache) -> ...
Process = Callable[[jax.Array, jax.Array], jax.Array]  # (scores B x V, new-token index) -> scores


@dataclasses.dataclass(frozen=True)
class Search:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy (or beam search with num_beams > 1)
  top_p: float = 1.0  # nucleus: sample from the smallest set of tokens with this much probability
  num_beams: int = 1
  length_penalty: float = 1.0  # beam scores are log-probability sums / generated length ** length_penalty
  early_stopping: bool | str = False  # True: stop once num_beams hypotheses finish; "never": the canonical search

  @classmethod
  def from_config(cls, g: GenerateConfig) -> Search:
    return cls(g.max_new_tokens, g.temperature, g.top_p, g.num_beams, g.length_penalty, g.early_stopping)


GREEDY = Search()  # 32 new tokens, argmax


def unchanged(scores_BxV: jax.Array, i: jax.Array) -> jax.Array:
  """The `process` of a model without forced or banned tokens."""
  del i
  return scores_BxV


def sample(logits_BxV: jax.Array, rng: jax.Array, s: Search) -> jax.Array:
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


def sample_loop(first_logits_BxV: jax.Array, cache: Any, step: Step, eos: Sequence[int], fill: int, rng: jax.Array,
                s: Search, process: Process = unchanged) -> tuple[jax.Array, jax.Array]:
  """Greedy or sampled decoding: (tokens B x N, lengths B, each up to and with the row's first EOS)."""
  b, n = first_logits_BxV.shape[0], s.max_new_tokens
  eos_ids = jnp.asarray(eos, jnp.int32)
  rng, first_rng = jax.random.split(rng)
  token_B = sample(process(first_logits_BxV, jnp.int32(0)), first_rng, s)
  tokens_BxN = jnp.full((b, n), fill, jnp.int32).at[:, 0].set(token_B)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, cache, tokens_BxN, done_B, lengths_B, rng = carry
    logits_BxV, cache = step(jax.lax.dynamic_index_in_dim(tokens_BxN, i - 1, 1, keepdims=False), i, cache)
    rng, step_rng = jax.random.split(rng)
    token_B = jnp.where(done_B, fill, sample(process(logits_BxV, i), step_rng, s))  # finished rows emit `fill`
    tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], i, 1)
    lengths_B = jnp.where(done_B, lengths_B, i + 1)
    return i + 1, cache, tokens_BxN, done_B | jnp.isin(token_B, eos_ids), lengths_B, rng

  carry = (jnp.int32(1), cache, tokens_BxN, jnp.isin(token_B, eos_ids), jnp.ones(b, jnp.int32), rng)
  _, _, tokens_BxN, _, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  return tokens_BxN, lengths_B


def _take(x: jax.Array, index_BxJ: jax.Array) -> jax.Array:
  """x[b, index[b, j], ...] for x of B x k x ... (transformers' _gather_beams)."""
  index = index_BxJ.reshape(index_BxJ.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def beam_search(first_logits: jax.Array, cache: Any, step: Step, reorder: Callable[[Any, jax.Array], Any],
                eos: Sequence[int], fill: int, s: Search, process: Process = unchanged) -> tuple[jax.Array, jax.Array]:
  """transformers' beam search over B x k rows (beam j of row i is row i * k + j of the logits and cache): the
  best hypothesis per row, (tokens B x N, its length B). `reorder(cache, rows)` keeps the cache rows given."""
  k, n = s.num_beams, s.max_new_tokens
  b = first_logits.shape[0] // k
  top = max(2, 1 + len(eos)) * k  # continuations kept per step: enough to leave k unfinished
  in_top_k = jnp.arange(top) < k
  eos_ids = jnp.asarray(eos)
  never, lp = s.early_stopping == "never", s.length_penalty
  stop_when_full = s.early_stopping is True

  def advance(i, logits, carry):
    """The beams after new token i, whose logits (B*k x V) are given."""
    _, _, cache, run_tokens, run_scores, tokens, scores, lengths, finished, open_B1 = carry
    logp = process(jax.nn.log_softmax(logits), i)
    v = logp.shape[-1]
    logp = (logp.reshape(b, k, v) + run_scores[:, :, None]).reshape(b, k * v)
    # The best `top` continuations over all beams.
    top_logp, top_index = jax.lax.top_k(logp, top)
    from_beam, token = top_index // v, top_index % v
    top_tokens = _take(run_tokens, from_beam).at[:, :, i].set(token)
    hits = jnp.isin(token, eos_ids) | (i + 1 >= n)  # ends here: EOS, or the length limit
    # The k best that go on.
    going = top_logp + hits * NEG
    keep = jax.lax.top_k(going, k)[1]
    run_tokens, run_scores = _take(top_tokens, keep), _take(going, keep)
    cache = reorder(cache, (jnp.arange(b)[:, None] * k + _take(from_beam, keep)).reshape(-1))
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

  def cond(carry):
    i, go = carry[0], carry[1]
    return (i < n) & go

  def body(carry):
    i, cache, run_tokens = carry[0], carry[2], carry[3]
    last = jax.lax.dynamic_index_in_dim(run_tokens, i - 1, 2, keepdims=False).reshape(-1)  # B*k
    logits, cache = step(last, i, cache)
    return advance(i, logits, (*carry[:2], cache, *carry[3:]))

  run_tokens = jnp.full((b, k, n), fill, jnp.int32)
  run_scores = jnp.zeros((b, k)).at[:, 1:].set(NEG)  # only the first beam extends at the first step
  start = (jnp.int32(0), jnp.bool_(True), cache, run_tokens, run_scores, run_tokens, jnp.full((b, k), NEG),
           jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool), jnp.ones((b, 1), bool))
  out = jax.lax.while_loop(cond, body, advance(jnp.int32(0), first_logits, start))
  return out[5][:, 0], out[7][:, 0]
