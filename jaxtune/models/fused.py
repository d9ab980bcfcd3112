"""The accelerators' fused attention kernels behind attention.attend: Pallas splash attention (TPU) and cuDNN's
flash attention (GPU). Neither writes a B x H x L x S tensor: scores live in on-chip blocks.

Splash runs per device under shard_map (batch over the mesh's batch axes, heads over tensor), in Pallas
interpret mode where the devices are not TPUs (how the CPU tests check its values and gradients). Its masks
are static blocks (causal, local window) plus segment ids (padding and packed documents); grouped-query heads
share their key/value heads inside the kernel, and it soft-caps the scores itself (Gemma 2). cuDNN goes through
jax.nn.dot_product_attention, which in this jax takes no segment ids (padding and packed documents travel as a
dense B x 1 x L x S mask, logged) and no soft cap.
Dimensions: B batch, L queries, S keys, H query heads, G key/value heads, K head dim.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune import sharding

if TYPE_CHECKING:
  from jaxtune.models.attention import Mask
  from jaxtune.models.layers import Context

log = logging.getLogger(__name__)
SPLASH_BLOCK = 128  # lengths pad to a multiple; blocks of 512 where the padded length divides


def cudnn_refuses(q_BxLxHxK: jax.Array, mask: Mask, soft_cap: float | None = None) -> str | None:
  """Why cuDNN's fused attention cannot compute this (None: it can)."""
  if soft_cap is not None:
    return f"cuDNN's fused attention has no soft cap on the scores (attn_logit_softcapping {soft_cap})"
  if q_BxLxHxK.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN's fused attention takes bfloat16 or float16, not {q_BxLxHxK.dtype} (set model.compute_dtype)"
  if q_BxLxHxK.shape[-1] % 8 or q_BxLxHxK.shape[-1] > 256:
    return f"cuDNN's fused attention takes head dims that are multiples of 8 up to 256, not {q_BxLxHxK.shape[-1]}"
  if mask.window is not None and not mask.causal:
    return "cuDNN's fused attention takes a window only with causal attention"
  return None


def cudnn(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask: Mask, scale: float) -> jax.Array:
  """cuDNN flash attention: causal and window as cuDNN's own masks, segments as a dense B x 1 x L x S mask."""
  seen = None
  if mask.kv_segments is not None:
    kv = mask.kv_segments[:, None, None, :]
    seen = kv > 0 if mask.q_segments is None else (kv > 0) & (mask.q_segments[:, None, :, None] == kv)
    seen = jnp.broadcast_to(seen, (seen.shape[0], 1, q_BxLxHxK.shape[1], seen.shape[3]))  # the B x 1 x L x S bias
  window = None if mask.window is None else (mask.window - 1, 0)
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK.astype(q_BxLxHxK.dtype), v_BxSxGxK.astype(q_BxLxHxK.dtype),
                                      mask=seen, scale=scale, is_causal=mask.causal, local_window_size=window,
                                      implementation="cudnn")


def splash(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask: Mask, scale: float,
           ctx: Context, soft_cap: float | None = None) -> jax.Array:
  """Splash attention over the mesh: B x L x H x K; the scaled scores soft-capped at `soft_cap` when given."""
  b, length, h, _ = q_BxLxHxK.shape
  keys = k_BxSxGxK.shape[1]
  pad_q, pad_kv = -length % SPLASH_BLOCK, -keys % SPLASH_BLOCK
  q_seg, kv_seg = _segment_ids(mask, b, length, keys, pad_q or pad_kv)
  q_BxHxLxK = _pad((q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype)).transpose(0, 2, 1, 3), 2, pad_q)
  k_BxGxSxK, v_BxGxSxK = (_pad(x.astype(q_BxLxHxK.dtype).transpose(0, 2, 1, 3), 2, pad_kv)
                          for x in (k_BxSxGxK, v_BxSxGxK))
  interpret = ctx.mesh is None or ctx.mesh.devices.flat[0].platform != "tpu"
  batch_spec, head_spec, kv_head_spec = None, None, None
  if ctx.mesh is not None:
    batch_spec, _, head_spec, _ = sharding.spec_for(q_BxLxHxK.shape, ("batch", "length", "heads", "head_dim"),
                                                    ctx.mesh, ctx.rules)
    kv_head_spec = sharding.spec_for(k_BxSxGxK.shape, ("batch", "length", "kv_heads", "head_dim"), ctx.mesh,
                                     ctx.rules)[2]
    if head_spec != kv_head_spec:  # each device must hold whole groups of query heads with their key/value head
      head_spec = None
  heads_here = h // _size(ctx, head_spec)
  # Built here, outside shard_map: its block tables are constants of no trace, so the cached kernel serves the next.
  kernel = _kernel(heads_here, length + pad_q, keys + pad_kv, mask.causal, mask.window, soft_cap, interpret)

  def run(q, k, v, qs, ks):
    if qs is None:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=_segments_type()(qs, ks)))(q, k, v, qs, ks)

  if ctx.mesh is None:
    out = run(q_BxHxLxK, k_BxGxSxK, v_BxGxSxK, q_seg, kv_seg)
  else:
    heads = P(batch_spec, head_spec, None, None)
    segs = P(batch_spec, None)
    in_specs = (heads, heads, heads) + ((segs, segs) if q_seg is not None else (None, None))
    out = jax.shard_map(run, mesh=ctx.mesh, in_specs=in_specs, out_specs=heads, check_vma=False)(
        q_BxHxLxK, k_BxGxSxK, v_BxGxSxK, q_seg, kv_seg)
  return out[:, :, :length].transpose(0, 2, 1, 3)


def _size(ctx: Context, spec_entry) -> int:
  if spec_entry is None:
    return 1
  names = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)
  size = 1
  for name in names:
    size *= ctx.mesh.shape[name]
  return size


def _pad(x: jax.Array, axis: int, n: int, value: int = 0) -> jax.Array:
  if not n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n)
  return jnp.pad(x, widths, constant_values=value)


def _segment_ids(mask: Mask, b: int, length: int, keys: int, padded: bool) -> tuple[jax.Array | None, ...]:
  """Splash's segment ids: a query sees keys of its own id. Without query segments every query is 1 and
  padding keys 0; the length padding is 0 on both sides (its queries are dropped, its keys never seen)."""
  if mask.kv_segments is None and not padded:
    return None, None
  kv = jnp.ones((b, keys), jnp.int32) if mask.kv_segments is None else mask.kv_segments.astype(jnp.int32)
  if mask.q_segments is None:
    q, kv = jnp.ones((b, length), jnp.int32), (kv > 0).astype(jnp.int32)
  else:
    q = mask.q_segments.astype(jnp.int32)
  pad_q, pad_kv = -length % SPLASH_BLOCK, -keys % SPLASH_BLOCK
  return _pad(q, 1, pad_q), _pad(kv, 1, pad_kv)


def _segments_type():
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
  return splash_attention_kernel.SegmentIds


@functools.cache
def _kernel(heads: int, length: int, keys: int, causal: bool, window: int | None, soft_cap: float | None,
            interpret: bool):
  """The splash kernel for one device's heads (its masks are processed into block tables once per shape)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  if window is not None:
    one = masks.LocalMask((length, keys), (window - 1, 0 if causal else None), offset=0)
  elif causal:
    one = masks.CausalMask((length, keys))
  else:
    one = masks.FullMask((length, keys))
  block = 512 if length % 512 == 0 and keys % 512 == 0 else SPLASH_BLOCK
  blocks = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
  with jax.ensure_compile_time_eval():  # its block tables are constants, not values of the trace that first asks
    return kernel.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=soft_cap, interpret=interpret)
