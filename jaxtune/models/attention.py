"""Attention for every family, one entry point: `attend` runs the kernel `model.attention` names.

`auto` decides from the platform of the devices the step is compiled for (the mesh's), never from the host
that traces it: TPU -> Pallas splash attention, GPU -> cuDNN's fused attention, CPU -> jaxtune's C++ kernel on
one device (cpu_attention.py), else XLA's ops. A kernel runs only where it computes the same function:
the mask must be one it takes (`Mask.kernel_ok`), and dropout on the attention probabilities, which no fused
kernel draws, keeps `auto` on XLA's ops in training (logged once), so the recipe never changes silently;
naming a fused kernel explicitly trains without that dropout (also logged). A soft cap on the scores (Gemma 2)
runs in splash and as XLA ops; cuDNN and the CPU kernel have none, nor has the CPU kernel a window, so those
run as XLA ops (logged once). A layer of a mixed stack (windowed and full layers scanned as one) gets its
window flag as a traced `Mask.local`: XLA's ops mask with it, a fused kernel runs under lax.cond on it.
Decoding with a cache runs XLA's ops: one query per step reads memory, not FLOPs. So does any single query (the
encoders' first-token-only last layer, with its attention dropout), whatever is named: splash would pad it to a
block of 128 and cuDNN refuses it. Every path is tested against `reference`.

Dimensions: B batch, L queries, S keys, H query heads, G key/value heads (H = G x R), K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from jaxtune.models import cpu_attention, fused, layers

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "cpu", "reference")
QUERY_BLOCK = 128  # queries per block of XLA's causal attention (see `_query_blocks`)
_said: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query sees: key j is seen by query i when all the given conditions hold.

  kv_segments[j] > 0 (0 is padding); q_segments[i] == kv_segments[j] (packed rows: one document each);
  causal: kv_positions[j] <= q_positions[i], or j <= i without positions; window: i - j < window (only where
  `local` holds, when given). `bias` (float32, broadcast to B x H x L x S; T5's relative positions) is added to
  the scores.
  """
  q_segments: jax.Array | None = None  # B x L
  kv_segments: jax.Array | None = None  # B x S
  causal: bool = False
  q_positions: jax.Array | None = None  # B x L: causal by position (decoders; restart at 0 in each segment)
  kv_positions: jax.Array | None = None  # B x S
  window: int | None = None  # sliding-window attention: the query and the window - 1 keys before it
  local: jax.Array | None = None  # bool scalar, traced: whether `window` applies (one layer of a mixed stack)
  bias: jax.Array | None = None
  in_order: bool = True  # positions follow the index within a segment, so causal by index is causal by position

  def kernel_ok(self, length: int, keys: int) -> bool:
    """Whether a fused kernel (index-based masks, segment ids, no additive bias) computes this mask."""
    return self.bias is None and self.in_order and (not self.causal or length == keys)

  def dense(self, length: int, keys: int) -> jax.Array:
    """The mask spelled out: bool, broadcastable to B x 1 x L x S."""
    seen = jnp.ones((1, 1, length, keys), bool)
    if self.kv_segments is not None:
      seen = seen & (self.kv_segments > 0)[:, None, None, :]
      if self.q_segments is not None:
        seen = seen & (self.q_segments[:, None, :, None] == self.kv_segments[:, None, None, :])
    if self.causal or self.window is not None:
      if self.q_positions is not None:
        q_pos, kv_pos = self.q_positions[:, None, :, None], self.kv_positions[:, None, None, :]
      else:
        q_pos, kv_pos = jnp.arange(length)[:, None][None, None], jnp.arange(keys)[None, :][None, None]
      if self.causal:
        seen = seen & (kv_pos <= q_pos)
      if self.window is not None:
        near = q_pos - kv_pos < self.window
        seen = seen & (near if self.local is None else near | ~self.local)
    return seen


def prepare(requested: str, mesh: jax.sharding.Mesh) -> None:
  """What a model described for `mesh` needs before tracing: the CPU kernel built where it may run."""
  if requested in ("auto", "cpu") and mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu":
    cpu_attention.load()


def platform(ctx: layers.Context) -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices the step runs on: the mesh's, or the default backend's."""
  if ctx.mesh is None:
    return jax.default_backend()
  return ctx.mesh.devices.flat[0].platform


def say_once(message: str, warn: bool = False) -> None:
  if message not in _said:
    _said.add(message)
    (log.warning if warn else log.info)("%s", message)


def choose(ctx: layers.Context, q: jax.Array, k: jax.Array, mask: Mask, dropout: float,
           soft_cap: float | None = None) -> str:
  """The implementation that runs: ctx.attention, or for `auto` the platform's kernel where it applies."""
  wanted = ctx.attention
  if wanted not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention {wanted!r}: expected one of {IMPLEMENTATIONS}")
  if wanted in ("xla", "reference"):
    return wanted
  if q.shape[1] == 1 < k.shape[1]:  # one query (an encoder's first-token-only last layer): nothing worth a kernel
    return "xla"
  fits = mask.kernel_ok(q.shape[1], k.shape[1])
  where = platform(ctx)
  if wanted == "auto":
    if not fits:
      return "xla"
    if where == "cpu":
      return "cpu" if _cpu_takes(ctx, q, k, mask, soft_cap) else "xla"
    kernel = {"tpu": "splash", "gpu": "cudnn"}.get(where)
    if kernel is None:
      return "xla"
    if kernel == "cudnn" and (why := fused.cudnn_refuses(q, mask, soft_cap)):
      say_once(f"{why}: attention runs as XLA ops")
      return "xla"
    if dropout > 0:
      say_once(f"attention dropout {dropout} kept: training attention runs as XLA ops ({kernel} draws no dropout); "
               f"set model.attention: {kernel} to train with the fused kernel and without attention dropout")
      return "xla"
    return kernel
  if not fits:
    say_once(f"model.attention: {wanted} does not take this attention (an additive bias, a cache, or causal "
             f"attention over keys of another length): it runs as XLA ops")
    return "xla"
  if wanted == "cpu" and not _cpu_takes(ctx, q, k, mask, soft_cap):
    say_once("model.attention: cpu needs float32 on one CPU device and a built kernel: attention runs as XLA ops")
    return "xla"
  if wanted == "cudnn" and (why := fused.cudnn_refuses(q, mask, soft_cap)):
    say_once(f"model.attention: cudnn: {why}: attention runs as XLA ops")
    return "xla"
  if dropout > 0 and wanted in ("splash", "cudnn"):
    say_once(f"model.attention: {wanted} draws no dropout: attention-probability dropout ({dropout}) is not applied "
             f"in training (the rest of the recipe is unchanged)", warn=True)
  return wanted


def _cpu_takes(ctx: layers.Context, q: jax.Array, k: jax.Array, mask: Mask, soft_cap: float | None) -> bool:
  """The C++ kernel: float32, one CPU device (a custom call is not partitioned), segments given, no window and no
  soft cap (it has neither: said once where they alone keep it out)."""
  one_device = ctx.mesh.devices.size == 1 if ctx.mesh is not None else jax.device_count() == 1
  if not (platform(ctx) == "cpu" and one_device and q.shape[1] == k.shape[1] and q.dtype == k.dtype == jnp.float32
          and mask.kv_segments is not None and (mask.causal == (mask.q_segments is not None))
          and cpu_attention.loaded()):
    return False
  for lacks, what in ((mask.window is not None, "sliding window"), (soft_cap is not None, "soft cap on the scores")):
    if lacks:
      say_once(f"the C++ CPU attention kernel has no {what}: that attention runs as XLA ops")
      return False
  return True


def attend(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, ctx: layers.Context, mask: Mask,
           scale: float | None = None, dropout_rate: float = 0.0, rng: jax.Array | None = None,
           soft_cap: float | None = None) -> jax.Array:
  """softmax(cap(scale * q k^T) + mask) v, B x L x H x K; `scale` defaults to 1 / sqrt(K); cap(s) = tanh(s / soft_cap)
  * soft_cap with a `soft_cap`. G may divide H (grouped queries): the key/value heads are shared, never repeated.
  Dropout on the probabilities with `rng`."""
  scale = 1.0 / math.sqrt(q_BxLxHxK.shape[-1]) if scale is None else scale
  dropout = dropout_rate if rng is not None else 0.0
  run = functools.partial(_run, q_BxLxHxK=q_BxLxHxK, k_BxSxGxK=k_BxSxGxK, v_BxSxGxK=v_BxSxGxK, ctx=ctx, scale=scale,
                          dropout_rate=dropout_rate, rng=rng, soft_cap=soft_cap)
  if mask.local is None or mask.window is None:
    mask = dataclasses.replace(mask, local=None)
    return run(choose(ctx, q_BxLxHxK, k_BxSxGxK, mask, dropout, soft_cap), mask=mask)
  windowed, full = dataclasses.replace(mask, local=None), dataclasses.replace(mask, window=None, local=None)
  ways = [choose(ctx, q_BxLxHxK, k_BxSxGxK, m, dropout, soft_cap) for m in (windowed, full)]
  if ways[0] == ways[1] and ways[0] in ("xla", "reference"):  # their dense mask reads the layer's flag itself
    return run(ways[0], mask=mask)
  # A fused kernel's mask is static: both are built, and the layer's flag picks which one runs.
  return jax.lax.cond(mask.local, lambda: run(ways[0], mask=windowed), lambda: run(ways[1], mask=full))


def _run(how: str, *, q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, ctx: layers.Context,
         mask: Mask, scale: float, dropout_rate: float, rng: jax.Array | None, soft_cap: float | None) -> jax.Array:
  """Attention as implementation `how` computes it (`choose` sent a soft cap to reference, splash or xla only)."""
  if how == "reference":
    return reference(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, dropout_rate, rng, soft_cap)
  if how == "splash":
    return fused.splash(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, ctx, soft_cap)
  if how == "cudnn":
    if mask.kv_segments is not None:
      say_once("cuDNN attention: padding and packed documents go as a dense B x 1 x L x S mask (cuDNN reads it as a "
               "bias): jax.nn.dot_product_attention takes no segment ids in this jax")
    return fused.cudnn(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale)
  if how == "cpu":
    return _cpu(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, dropout_rate, rng)
  return xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, dropout_rate, rng, soft_cap)


def reference(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask: Mask, scale: float,
              dropout_rate: float = 0.0, rng: jax.Array | None = None, soft_cap: float | None = None) -> jax.Array:
  """The definition every kernel is tested against: float32 scores and softmax over the dense mask."""
  b, length, h, k = q_BxLxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, g, h // g, k)
  k_BxSxGxK, v_BxSxGxK = k_BxSxGxK.astype(q_BxLxHxK.dtype), v_BxSxGxK.astype(q_BxLxHxK.dtype)
  scores = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK).astype(jnp.float32) * scale
  scores = layers.soft_cap(scores, soft_cap)
  scores = scores.reshape(b, h, length, s)
  if mask.bias is not None:
    scores = scores + mask.bias
  scores = jnp.where(mask.dense(length, s), scores, jnp.finfo(jnp.float32).min)
  probs = layers.dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, rng).astype(q_BxLxHxK.dtype)
  return jnp.einsum("bgrls,bsgk->blgrk", probs.reshape(b, g, h // g, length, s), v_BxSxGxK).reshape(b, length, h, k)


def xla(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask: Mask, scale: float,
        dropout_rate: float = 0.0, rng: jax.Array | None = None, soft_cap: float | None = None) -> jax.Array:
  """Attention as XLA ops, heads in front of the length so both products are batched matmuls over each
  operand's minor dimension (on a CPU XLA otherwise lays them out transposed).

  Causal attention over its own tokens (no cache) runs in blocks of queries that skip the masked upper
  right of the L x L square (`_query_blocks`). Dropout draws its keep mask over B x H x L x S (one block:
  the encoders' and encoder-decoders' layout) or per block of B x G x R x L x S (the decoders').
  """
  b, length, h, k = q_BxLxHxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  k_BxSxGxK, v_BxSxGxK = k_BxSxGxK.astype(q_BxLxHxK.dtype), v_BxSxGxK.astype(q_BxLxHxK.dtype)
  if not mask.causal and g == h and mask.window is None and mask.q_segments is None:
    q_BxHxLxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxSxGxK, v_BxSxGxK))
    scores_BxHxLxS = jnp.einsum("bhqk,bhtk->bhqt", q_BxHxLxK, k_BxHxSxK).astype(jnp.float32) * scale
    scores_BxHxLxS = layers.soft_cap(scores_BxHxLxS, soft_cap)
    if mask.kv_segments is not None:
      scores_BxHxLxS = scores_BxHxLxS + layers.attention_bias(mask.kv_segments, jnp.float32)
    if mask.bias is not None:
      scores_BxHxLxS = scores_BxHxLxS + mask.bias
    probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1).astype(q_BxLxHxK.dtype)
    ctx_BxHxLxK = layers.dropout_matmul("bhqt,bhtk->bhqk", probs_BxHxLxS, v_BxHxSxK, dropout_rate, rng)
    return ctx_BxHxLxK.transpose(0, 2, 1, 3)
  mask_BxLxS = jnp.broadcast_to(mask.dense(length, s), (b, 1, length, s))[:, 0]
  q_BxGxRxLxK = q_BxLxHxK.reshape(b, length, g, h // g, k).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK, v_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)
  bias = None if mask.bias is None else jnp.broadcast_to(mask.bias, (b, h, length, s)).reshape(b, g, h // g, length, s)
  own = mask.causal and mask.in_order and length == s and bias is None
  blocks = _query_blocks(length) if own else [(0, length, s)]
  rngs = [rng] if len(blocks) == 1 else layers.split_rng(rng if dropout_rate > 0 else None, len(blocks))
  out = []
  for (q0, q1, s1), r in zip(blocks, rngs):  # without a cache, query i never sees a key beyond i
    scores = jnp.einsum("bgrlk,bgsk->bgrls", q_BxGxRxLxK[:, :, :, q0:q1], k_BxGxSxK[:, :, :s1]).astype(jnp.float32)
    scores = layers.soft_cap(scores * scale, soft_cap)
    scores = scores if bias is None else scores + bias[:, :, :, q0:q1, :s1]
    scores = jnp.where(mask_BxLxS[:, None, None, q0:q1, :s1], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, -1).astype(q_BxLxHxK.dtype)
    out.append(layers.dropout_matmul("bgrls,bgsk->bgrlk", probs, v_BxGxSxK[:, :, :s1], dropout_rate, r))
  ctx_BxGxRxLxK = out[0] if len(out) == 1 else jnp.concatenate(out, axis=3)
  return ctx_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(b, length, h, k)


def _query_blocks(length: int) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) per block of queries; each block's keys end where its queries do.

  Without a cache, keys and queries are the same tokens in the same order, and a key after query i is
  either later in i's document (causal) or in another document: masked either way. Block j of n
  attends to the first j + 1 blocks of keys, so the scores, softmax and both products skip the masked
  upper right of the L x L square: 3/4 of the work for two blocks.
  """
  return [(q0, min(q0 + QUERY_BLOCK, length), min(q0 + QUERY_BLOCK, length)) for q0 in range(0, length, QUERY_BLOCK)]


def _cpu(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask: Mask, scale: float,
         dropout_rate: float, rng: jax.Array | None) -> jax.Array:
  """jaxtune's C++ kernel (scale 1 / sqrt(K) built in): the decoders' segment-causal attention, without dropout,
  or the encoders' over unpadded keys with dropout; otherwise XLA's ops."""
  default_scale = math.isclose(scale, 1.0 / math.sqrt(q_BxLxHxK.shape[-1]), rel_tol=1e-12)
  if not default_scale:
    say_once("the C++ CPU attention kernel computes the 1 / sqrt(head_dim) scale only: attention with another "
             "(e.g. Gemma's query_pre_attn_scalar**-0.5) runs as XLA ops")
  dropout = rng is not None and dropout_rate > 0
  if default_scale and mask.causal and not dropout:
    positions = (mask.kv_positions if mask.kv_positions is not None
                 else jnp.broadcast_to(jnp.arange(q_BxLxHxK.shape[1]), mask.kv_segments.shape))
    return cpu_attention.attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask.kv_segments, positions)
  if (default_scale and not mask.causal and k_BxSxGxK.shape[2] == q_BxLxHxK.shape[2]
      and (not dropout or cpu_attention.dropout_supported(q_BxLxHxK.shape))):
    return cpu_attention.bidirectional_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask.kv_segments, dropout_rate, rng)
  return xla(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, dropout_rate, rng)
