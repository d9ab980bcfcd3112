"""Quantised frozen kernels for QLoRA-style training: int8 and NF4 (QLoRA's 4-bit NormalFloat, double-quantised).

Why our own ~150 lines and not qwix or AQT: those libraries quantise matmuls for quantisation-aware training
and serving (their own code books, scale layouts and rounding), while a QLoRA base must be the one
bitsandbytes would make, so that an adapter trained here sees the weights PEFT + bitsandbytes would give it,
and the test holds the code book and the block quantiser to bitsandbytes bit for bit. Both are small enough
to own: a code book lookup, absmax blocks, and a custom VJP.

NF4, as bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)` quantises a
torch Linear's weight: the kernel flattened in torch's (*out, *in) order, so each block of 64 runs along the
inputs of one output channel, as in a PEFT + bitsandbytes base; each block scaled by its absmax into [-1, 1] and
every value replaced by the index of the nearest of 16 NormalFloat levels (bucketised at the midpoints), two
indices a byte (the first in the high nibble). Double quantisation: the float32 absmaxes, less their mean
(`offset`), are quantised in blocks of 256 with bitsandbytes' signed 8-bit dynamic code book, keeping one float32 absmax
per 256 blocks. So a weight costs 4 + 8/64 + 32/(64*256) bits. int8: one absmax per output channel
(bitsandbytes' `int8_vectorwise_quant` rows), q = round(w * 127 / absmax).

A kernel here is our layout (*in, *out), quantised per layer: a stacked kernel (N x *in x *out) keeps its
leading layer axis on every array of its quantised form, so the layer scan slices it like any param and a
layer dequantises only its own kernel. `matmul`'s backward pass keeps the quantised kernel, not the
dequantised one, as its residual, so the full-precision kernels never live all at once, with or without remat.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune import sharding

NF4_BLOCK = 64  # weights per first-level absmax (QLoRA's and PEFT's default)
ABSMAX_BLOCK = 256  # first-level absmaxes per second-level one (bitsandbytes' nested blocksize)
# bitsandbytes' NF4 table (backends/utils.py _NF4_QUANT_TABLE; create_normal_map(0.9677083) rounded to float32).
NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], np.float32)
# bitsandbytes' create_dynamic_map(signed=True): 256 sorted float32 levels, little-endian hex. Held as bytes because
# torch.linspace rounds differently from numpy's, so recomputing it here would not give the same levels.
DYNAMIC_CODE = np.frombuffer(bytes.fromhex(
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf000053bf66664fbf"
    "cdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf"
    "666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be"
    "0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be"
    "666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd"
    "2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bc"
    "cdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbbfca9f1ba9defa7ba"
    "ff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6"
    "b7a313b500000000b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a"
    "806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d"
    "0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e"
    "9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e"
    "9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f"
    "3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f"
    "9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
), "<f4").copy()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4:
  """A kernel (*lead, *shape) in NF4, flattened in torch's order (*out, *in): codes (*lead, ceil(n/2)) uint8,
  absmax (*lead, blocks) uint8 (dynamic code indices), absmax_scale (*lead, ceil(blocks/256)) float32, offset
  (*lead,) float32; n = prod(shape)."""
  codes: jax.Array
  absmax: jax.Array
  absmax_scale: jax.Array
  offset: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})  # one layer's kernel, our (*in, *out)
  n_in: int = dataclasses.field(metadata={"static": True})  # codes run in torch's (*out, *in) order


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8:
  """A kernel (*lead, *in, *out) as int8 codes of the same shape and one float32 absmax per output channel
  (*lead, *out)."""
  codes: jax.Array
  absmax: jax.Array
  n_out: int = dataclasses.field(metadata={"static": True})


Quantised = NF4 | Int8


def is_quantised(x: Any) -> bool:
  return isinstance(x, (NF4, Int8))


def _blockwise(flat: jax.Array, code: np.ndarray, block: int) -> tuple[jax.Array, jax.Array]:
  """(code indices uint8, float32 absmax per block) of a 1-D float32 array, as bitsandbytes' CPU kernels
  compute them: full blocks scaled by the absmax's reciprocal, a short last block divided by its absmax."""
  n = flat.shape[0]
  full = n - n % block
  blocks = flat[:full].reshape(-1, block)
  absmax = jnp.abs(blocks).max(axis=-1)
  scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1).reshape(-1)
  if n % block:
    last = jnp.maximum(jnp.abs(flat[full:]).max(), 1e-38)
    absmax = jnp.concatenate([absmax, last[None]])
    scaled = jnp.concatenate([scaled, jnp.clip(flat[full:] / last, -1, 1)])
  bounds = jnp.asarray((code[:-1] + code[1:]) / 2)  # bucketised at the midpoints: a tie goes to the lower level
  return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8), absmax


def _unblock(values: jax.Array, absmax: jax.Array, block: int) -> jax.Array:
  """values (n,) times their block's absmax, in float32."""
  n = values.shape[0]
  pad = -n % block
  out = jnp.pad(values, (0, pad)).reshape(-1, block) * absmax[:, None]
  return out.reshape(-1)[:n]


def _torch_order(w: jax.Array, n_in: int) -> jax.Array:
  """One layer's kernel (*in, *out) as torch's Linear weight (*out, *in) flattens it."""
  return jnp.moveaxis(w, tuple(range(n_in)), tuple(range(w.ndim - n_in, w.ndim))).reshape(-1)


def _nf4_codes(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
  """(packed NF4 codes, float32 absmax per block of 64) of one layer's kernel, in torch's order."""
  flat = _torch_order(w, n_in)
  idx, absmax = _blockwise(flat, NF4_CODE, NF4_BLOCK)
  idx = jnp.pad(idx, (0, flat.shape[0] % 2))
  return (idx[::2] << 4) | idx[1::2], absmax


def _nf4_dequant_one(codes: jax.Array, absmax: jax.Array, absmax_scale: jax.Array, offset: jax.Array,
                     n: int) -> jax.Array:
  absmax = _unblock(jnp.asarray(DYNAMIC_CODE)[absmax], absmax_scale, ABSMAX_BLOCK) + offset
  idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:n]
  return _unblock(_nf4_levels(idx), absmax, NF4_BLOCK)


def _nf4_levels(idx: jax.Array) -> jax.Array:
  """NF4_CODE[idx] as 15 selects rather than a gather: elementwise, so XLA fuses the whole dequantisation (codes
  to the kernel in the matmul's dtype) into one pass instead of writing float32 temporaries the kernel's size."""
  out = jnp.full(idx.shape, NF4_CODE[0], jnp.float32)
  for k in range(1, len(NF4_CODE)):
    out = jnp.where(idx == k, NF4_CODE[k], out)
  return out


def _over_lead(fn: Any, n_lead: int) -> Any:
  for _ in range(n_lead):
    fn = jax.vmap(fn)
  return fn


def _second_level(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _blockwise(absmax - offset, DYNAMIC_CODE, ABSMAX_BLOCK)


def _int8(w: jax.Array, n_lead: int, n_in: int) -> Int8:
  in_axes = tuple(range(n_lead, n_lead + n_in))
  absmax = jnp.abs(w).max(axis=in_axes)
  codes = jnp.round(w * (127.0 / jnp.expand_dims(absmax, in_axes))).astype(jnp.int8)
  return Int8(codes, absmax, n_out=w.ndim - n_lead - n_in)


def quantise(w: jax.Array, kind: str, n_lead: int, n_in: int, out: Quantised | None = None) -> Quantised:
  """`w` (*lead, *in, *out) quantised per leading index (a stacked kernel: per layer), as `kind` (nf4 / int8);
  `out`: where each array of the result goes (`placement`), each computed there from `w`'s own shards.

  Called at load time, outside jit (the NF4 offset is computed on the host)."""
  w = w.astype(jnp.float32)
  put = (lambda *names: tuple(getattr(out, n) for n in names)) if out is not None else (lambda *names: None)
  if kind == "nf4":
    codes, absmax = jax.jit(_over_lead(functools.partial(_nf4_codes, n_in=n_in), n_lead),
                            out_shardings=put("codes", "absmax"))(w)
    # The mean is taken on the host in float64, so the offset is the correctly rounded mean on every platform;
    # bitsandbytes' is its backend's float32 sum (its CPU and CUDA kernels round differently), within an ulp of it.
    offset = _on_host(absmax).astype(np.float64).mean(axis=-1).astype(np.float32)
    offset = jax.device_put(offset, out.offset) if out is not None else jnp.asarray(offset)
    second = jax.jit(_over_lead(_second_level, n_lead), out_shardings=put("absmax", "absmax_scale"))
    return NF4(codes, *second(absmax, offset), offset, shape=tuple(w.shape[n_lead:]), n_in=n_in)
  if kind == "int8":
    return jax.jit(functools.partial(_int8, n_lead=n_lead, n_in=n_in), out_shardings=out)(w)
  raise ValueError(f"no quantisation {kind!r}")


def _on_host(x: jax.Array) -> np.ndarray:
  """The whole of `x` as numpy, also where its shards live on other processes (a multi-host FSDP mesh)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def abstract(w: jax.ShapeDtypeStruct, kind: str, n_lead: int, n_in: int) -> Quantised:
  """The shapes and dtypes `quantise` gives a kernel shaped like `w`, computing nothing."""
  if kind == "nf4":
    codes, absmax = jax.eval_shape(_over_lead(functools.partial(_nf4_codes, n_in=n_in), n_lead), w)
    offset = jax.ShapeDtypeStruct(w.shape[:n_lead], jnp.float32)
    return NF4(codes, *jax.eval_shape(_over_lead(_second_level, n_lead), absmax, offset), offset,
               shape=tuple(w.shape[n_lead:]), n_in=n_in)
  return jax.eval_shape(functools.partial(_int8, n_lead=n_lead, n_in=n_in), w)


def placement(q: Quantised, kernel: NamedSharding) -> Quantised:
  """Where each array of a quantised kernel `q` (abstract) lives, given the float kernel's `kernel` sharding, so
  that FSDP and tensor parallelism split a quantised base as they split a float one.

  Every array keeps the kernel's leading (layer) axes. Int8 codes are the kernel's shape and take its spec; their
  absmax takes the spec of the kernel's output dims. NF4's codes and first-level absmaxes are flat, in torch's
  (*out, *in) order, so they are split in even contiguous runs over every mesh axis that splits the kernel
  (where the runs hold whole blocks of 64; else they stay whole); the second-level scales and the offset, 1/16384
  of the weights, are replicated. Inside the step a layer's dequantised kernel is then resharded as its float
  kernel would be gathered (XLA chooses where)."""
  mesh, spec = kernel.mesh, tuple(kernel.spec) + (None,) * (q.codes.ndim - len(kernel.spec))
  if isinstance(q, Int8):
    n_lead = q.absmax.ndim - q.n_out
    return Int8(NamedSharding(mesh, P(*spec)), NamedSharding(mesh, P(*spec[:n_lead], *spec[q.codes.ndim - q.n_out:])),
                n_out=q.n_out)
  n_lead = q.offset.ndim
  lead = spec[:n_lead]
  axes = sharding.spec_axes(spec[n_lead:])
  ways = math.prod(mesh.shape[a] for a in axes)
  even = axes and q.absmax.shape[-1] % ways == 0 and q.codes.shape[-1] == q.absmax.shape[-1] * NF4_BLOCK // 2
  flat = (axes if len(axes) > 1 else axes[0]) if even else None
  whole = NamedSharding(mesh, P(*lead, None))
  return NF4(NamedSharding(mesh, P(*lead, flat)), NamedSharding(mesh, P(*lead, flat)), whole,
             NamedSharding(mesh, P(*lead)), shape=q.shape, n_in=q.n_in)


def held_bytes(q: Quantised) -> int:
  """Bytes of all the arrays of a quantised kernel (abstract or real)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(q))


def dequantise(q: Quantised) -> jax.Array:
  """The float32 kernel a quantised one stands for (bitsandbytes' dequantisation, in its order of operations)."""
  if isinstance(q, NF4):
    n_lead = q.offset.ndim
    n = math.prod(q.shape)
    fn = _over_lead(lambda c, a, s, o: _nf4_dequant_one(c, a, s, o, n), n_lead)
    flat = fn(q.codes, q.absmax, q.absmax_scale, q.offset)
    shape_in, shape_out = q.shape[:q.n_in], q.shape[q.n_in:]
    torch_order = flat.reshape(*flat.shape[:n_lead], *shape_out, *shape_in)
    n_out = len(shape_out)
    return jnp.moveaxis(torch_order, tuple(range(n_lead + n_out, n_lead + n_out + q.n_in)),
                        tuple(range(n_lead, n_lead + q.n_in)))
  n_in = q.codes.ndim - q.absmax.ndim
  scale = q.absmax * (1.0 / 127.0)
  return q.codes.astype(jnp.float32) * jnp.expand_dims(scale, tuple(range(q.absmax.ndim - q.n_out,
                                                                           q.absmax.ndim - q.n_out + n_in)))


def dequantised(tree: Any) -> Any:
  """A param tree with every quantised kernel replaced by its float32 form."""
  return jax.tree.map(lambda x: dequantise(x) if is_quantised(x) else x, tree, is_leaf=is_quantised)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, q: Quantised, n_in: int) -> jax.Array:
  """tensordot(x, dequantise(q), n_in) in x's dtype; the backward pass dequantises again rather than keep the
  float kernel as a residual, and gives the frozen kernel no gradient."""
  return jnp.tensordot(x, dequantise(q).astype(x.dtype), axes=n_in)


def _matmul_fwd(x: jax.Array, q: Quantised, n_in: int) -> tuple[jax.Array, tuple[Quantised, jax.Array]]:
  return matmul(x, q, n_in), (q, jnp.zeros((), x.dtype))


def _matmul_bwd(n_in: int, residuals: tuple[Quantised, jax.Array], dy: jax.Array) -> tuple[jax.Array, Any]:
  q, like = residuals
  kernel = dequantise(q).astype(like.dtype)
  n_tokens = dy.ndim - (kernel.ndim - n_in)
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(n_tokens, dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())))
  return dx, jax.tree.map(_no_gradient, q)


def _no_gradient(a: jax.Array) -> Any:
  if jnp.issubdtype(a.dtype, jnp.floating):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)  # integer codes: the cotangent type of a non-differentiable array


matmul.defvjp(_matmul_fwd, _matmul_bwd)
