"""The LM head read a vocabulary block at a time: cross-entropy without the B x L x V logits.

With a large vocabulary the float32 logits outgrow everything else a fine-tuning step holds (Llama 3: 128,256
tokens x 4096 positions x 4 bytes = 2.1 GB a sequence, and the same again for their gradient). A causal-LM or
seq2seq model called with `vocab_block` > 0 returns a `TiledHead` in place of its logits: the final hidden states
and the head's table. The loss then runs over blocks of `block` vocabulary rows: block logits, an online
logsumexp and the label's logit forward; softmax - onehot of each block again backward (a custom VJP, so autodiff
keeps no block either), giving d hidden = sum_blocks dz W_block and d W_block = dz^T hidden. What stays live is
N x D and a few N x block arrays (N = B x L tokens). Gemma 2's soft cap on the logits (tanh(z / cap) * cap) is
applied to each block, and its derivative 1 - tanh^2 to each block's dz.

Dimensions: B batch, L length, N = B x L tokens, D model dim, V vocab, C block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models import layers

AUTO_MIN_VOCAB = 32768  # below this the logits cost less than a layer's activations at usual lengths: no tiling
AUTO_BLOCK = 8192  # N x C float32 per live block array: 128 MiB at 4096 tokens


def block_for(vocab_size: int, setting: int | None) -> int:
  """The block size a loss tiles the vocabulary with: `setting` (train.loss_vocab_block) when given (0: off),
  else AUTO_BLOCK once the vocabulary reaches AUTO_MIN_VOCAB (Llama 3, Qwen2, GPT-2, SmolLM2), else off."""
  if setting is not None:
    return max(int(setting), 0)
  return AUTO_BLOCK if vocab_size >= AUTO_MIN_VOCAB else 0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["hidden", "table", "bias"],
                   meta_fields=["block", "vocab_axis", "soft_cap"])
@dataclasses.dataclass(frozen=True)
class TiledHead:
  """What an LM returns as its `logits` when asked for tiles: logits = hidden . table (+ bias), never formed."""
  hidden: jax.Array  # B x L x D, the compute dtype, any head scaling (T5's d_model**-0.5) already applied
  table: jax.Array  # V x D (a tied embedding: vocab_axis 0) or D x V (an lm_head kernel: vocab_axis 1)
  bias: jax.Array | None  # V float32, no gradient (BART's final_logits_bias), or None
  block: int
  vocab_axis: int
  soft_cap: float | None = None  # logits z -> tanh(z / soft_cap) * soft_cap (Gemma 2's final_logit_softcapping)

  @property
  def vocab_size(self) -> int:
    return self.table.shape[self.vocab_axis]

  def logits(self) -> jax.Array:
    """The plain float32 B x L x V logits (for outputs that need them; the loss does not)."""
    z = jax.lax.dot_general(self.hidden, self.table, _dims(self.hidden.ndim, self.vocab_axis))
    z = z.astype(jnp.float32)
    return layers.soft_cap(z if self.bias is None else z + jax.lax.stop_gradient(self.bias), self.soft_cap)

  def token_losses(self, targets_BxL: jax.Array) -> jax.Array:
    """float32 B x L cross-entropy of each target token, logsumexp(logits) - logits[target], block by block."""
    b, l, d = self.hidden.shape
    bias = None if self.bias is None else jax.lax.stop_gradient(self.bias.astype(jnp.float32))
    targets_N = targets_BxL.reshape(b * l).astype(jnp.int32)
    loss_N = _cross_entropy(self.hidden.reshape(b * l, d), self.table, bias, targets_N, self.block, self.vocab_axis,
                            self.soft_cap)
    return loss_N.reshape(b, l)


def head(hidden_BxLxD: jax.Array, table: jax.Array, vocab_axis: int, block: int,
         bias_V: jax.Array | None = None, soft_cap: float | None = None) -> TiledHead:
  return TiledHead(hidden_BxLxD, table.astype(hidden_BxLxD.dtype), bias_V, block, vocab_axis, soft_cap)


def dense_table(dense: layers.Dense, ctx: layers.Context) -> jax.Array | None:
  """An lm_head Dense's D x V kernel with its LoRA adapter folded in (W + s A B: the adapter's gradient reaches A
  and B through the fold), or None where the layer cannot be read as one table: its adapter draws dropout on
  its input in this call, it has a bias, or its kernel is not one float array (a quantised frozen base, which
  only its own matmul reads). None means: use the plain logits."""
  kernel = dense.kernel.get_value()
  if dense.bias is not None or dense.n_in != 1 or not isinstance(kernel, jax.Array):
    return None
  if dense.lora_a is None:
    return kernel
  if ctx.adapter_rng is not None and dense.lora_dropout > 0:
    return None
  return kernel + dense.lora_scale * (dense.lora_a[...] @ dense.lora_b[...])


def _dims(h_ndim: int, vocab_axis: int) -> tuple[Any, Any]:
  """dot_general dims of hidden (..., D) against the table (V x D or D x V)."""
  return ((h_ndim - 1,), (1 - vocab_axis,)), ((), ())


def _over_blocks(fn: Callable[[Any, jax.Array | int, int], Any], carry: Any, vocab: int, block: int) -> Any:
  """fn(carry, start, size) over the vocabulary: a scan over the V // C full blocks (one block live at a time),
  then the remainder as one static block (no padded copy of the table)."""
  full, tail = divmod(vocab, block)
  if full:
    carry = jax.lax.scan(lambda c, start: (fn(c, start, block), None), carry, jnp.arange(full) * block)[0]
  return fn(carry, full * block, tail) if tail else carry


def _block_logits(h_NxD: jax.Array, table: jax.Array, bias: jax.Array | None, start: Any, size: int,
                  axis: int, soft_cap: float | None) -> tuple[jax.Array, jax.Array]:
  """(float32 N x C logits of vocabulary rows start..start+C, soft-capped when asked, the table's block)."""
  w = jax.lax.dynamic_slice_in_dim(table, start, size, axis)
  z_NxC = jax.lax.dot_general(h_NxD, w, _dims(2, axis), preferred_element_type=jnp.float32)
  if bias is not None:
    z_NxC = z_NxC + jax.lax.dynamic_slice_in_dim(bias, start, size)
  return layers.soft_cap(z_NxC, soft_cap), w


def _label_mask(targets_N: jax.Array, start: Any, size: int) -> jax.Array:
  """N x C: whether each token's target is column c of this block."""
  return (targets_N - start)[:, None] == jnp.arange(size)[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cross_entropy(h_NxD, table, bias, targets_N, block, axis, soft_cap):
  return _forward(h_NxD, table, bias, targets_N, block, axis, soft_cap)[0]


def _forward(h_NxD, table, bias, targets_N, block, axis, soft_cap):
  n = h_NxD.shape[0]

  def step(carry, start, size):
    m_N, s_N, label_N = carry
    z_NxC, _ = _block_logits(h_NxD, table, bias, start, size, axis, soft_cap)
    new_m_N = jnp.maximum(m_N, z_NxC.max(1))
    s_N = s_N * jnp.exp(m_N - new_m_N) + jnp.exp(z_NxC - new_m_N[:, None]).sum(1)
    label_N = label_N + jnp.where(_label_mask(targets_N, start, size), z_NxC, 0.0).sum(1)
    return new_m_N, s_N, label_N

  zeros = jnp.zeros((n,), jnp.float32)
  m_N, s_N, label_N = _over_blocks(step, (jnp.full((n,), -jnp.inf), zeros, zeros), table.shape[axis], block)
  lse_N = m_N + jnp.log(s_N)
  return lse_N - label_N, lse_N


def _fwd(h_NxD, table, bias, targets_N, block, axis, soft_cap):
  loss_N, lse_N = _forward(h_NxD, table, bias, targets_N, block, axis, soft_cap)
  return loss_N, (h_NxD, table, bias, targets_N, lse_N)


def _bwd(block, axis, soft_cap, residuals, g_N):
  """d loss / d z = g (softmax - onehot), recomputed a block at a time; the table's gradient is written block
  by block into one buffer of its own shape (updated in place in the loop)."""
  h_NxD, table, bias, targets_N, lse_N = residuals

  def step(carry, start, size):
    dh_NxD, dtable = carry
    u_NxC, w = _block_logits(h_NxD, table, bias, start, size, axis, None)
    t_NxC = None if soft_cap is None else jnp.tanh(u_NxC / soft_cap)
    z_NxC = u_NxC if soft_cap is None else t_NxC * soft_cap
    dz_NxC = (jnp.exp(z_NxC - lse_N[:, None]) - _label_mask(targets_N, start, size)) * g_N[:, None]
    if soft_cap is not None:  # back through z = cap tanh(u / cap), in the order autodiff of the plain logits takes
      dt_NxC = dz_NxC * soft_cap
      dz_NxC = (dt_NxC + dt_NxC * t_NxC) * (1.0 - t_NxC) / soft_cap
    dz_NxC = dz_NxC.astype(h_NxD.dtype)
    dh_NxD = dh_NxD + jax.lax.dot_general(dz_NxC, w, (((1,), (axis,)), ((), ())), preferred_element_type=jnp.float32)
    operands = (dz_NxC, h_NxD) if axis == 0 else (h_NxD, dz_NxC)  # C x D or D x C: the table's own layout
    dw = jax.lax.dot_general(*operands, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dh_NxD, jax.lax.dynamic_update_slice_in_dim(dtable, dw.astype(table.dtype), start, axis)

  zero = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros_like(table))
  dh_NxD, dtable = _over_blocks(step, zero, table.shape[axis], block)
  return dh_NxD.astype(h_NxD.dtype), dtable, None if bias is None else jnp.zeros_like(bias), None


_cross_entropy.defvjp(_fwd, _bwd)
