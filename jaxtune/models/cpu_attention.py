"""Attention on a CPU as one custom call each way (cpu_attention.cc, through jax.ffi).

XLA:CPU computes attention as separate ops: scores, mask, softmax, dropout and two products, each
writing a B x H x L x L float32 tensor to memory and, in the backward pass, reading them back; the
heads move in front of the length and back around them. The kernel takes the model's own layouts and
keeps each block of scores in cache: the decoders' segment-causal GQA attention (`attention`) and the
encoders' attention over unpadded keys with dropout (`bidirectional_attention`). attention.choose picks it
only for a one-device CPU mesh (a custom call is not partitioned, and a CPU kernel must never reach an
accelerator's program), in float32. It is compiled from source with the machine's C++ compiler by `load`,
when a model is described for such a mesh, never while tracing (cached in ~/.cache/jaxtune/kernels or
$JAXTUNE_KERNEL_DIR, keyed by source, compiler and its version, flags, jaxlib and CPU features). Without a
compiler, after a failed build (logged once) or with JAXTUNE_CPU_ATTENTION=0 attention runs as XLA ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_attention.cc")
_COMPILE = ["-w", "-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC"]
_FORWARD, _BACKWARD = "jaxtune_cpu_attention_fwd", "jaxtune_cpu_attention_bwd"


def load() -> bool:
  """Builds (once per machine, into the cache) and registers the kernel; whether it is available. Called when a
  model is described for a one-device CPU mesh (attention.prepare), never while a step is traced."""
  return _switched_on() and _library() is not None


def loaded() -> bool:
  """Whether `load` has made the kernel available in this process (attention.choose asks while tracing)."""
  return _switched_on() and _library.cache_info().currsize > 0 and _library() is not None


def _switched_on() -> bool:
  return os.environ.get("JAXTUNE_CPU_ATTENTION", "1") != "0"


def _cpu_id() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def _build_dir() -> Path:
  root = os.environ.get("JAXTUNE_KERNEL_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxtune", "kernels")
  return Path(root)


def find_compiler() -> str | None:
  """The C++ compiler the kernel is built with: $CXX, else g++ or c++ on the PATH."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The compiled kernel, registered with XLA; None (once, with a log line) where it cannot be built."""
  compiler = find_compiler()
  if compiler is None:
    log.info("no C++ compiler found: CPU attention runs as XLA ops")
    return None
  key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, _version(compiler), *_COMPILE, jaxlib.__version__,
                                  _cpu_id()]).encode())
  target = _build_dir() / f"cpu_attention_{key.hexdigest()[:16]}.so"
  try:
    if not target.exists():
      _compile(compiler, target)
    lib = ctypes.cdll.LoadLibrary(str(target))
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.JaxtuneAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.JaxtuneAttentionBackward), platform="cpu")
  except (OSError, subprocess.CalledProcessError, AttributeError) as e:
    log.warning("CPU attention kernel unavailable (%s): attention runs as XLA ops", e)
    return None
  return lib


def _version(compiler: str) -> str:
  """The compiler's own version line: a new compiler at the same path builds anew."""
  try:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return ""


def _compile(compiler: str, target: Path) -> None:
  """Object with -ffast-math, shared library without it (so the process's float mode is left alone)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    obj, so = Path(tmp) / "k.o", Path(tmp) / "k.so"
    run = functools.partial(subprocess.run, check=True, capture_output=True, text=True)
    try:
      run([compiler, *_COMPILE, "-I", jax.ffi.include_dir(), "-c", str(SOURCE), "-o", str(obj)])
      run([compiler, "-shared", str(obj), "-o", str(so)])
    except subprocess.CalledProcessError as e:
      errors = [ln for ln in e.stderr.splitlines() if "error" in ln] or e.stderr.splitlines()
      log.warning("compiling %s failed:\n%s", SOURCE.name, "\n".join(errors[:10]))
      raise
    os.replace(so, target)  # atomic: concurrent processes each build, the last rename wins


def attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, segments_BxL: jax.Array,
              positions_BxL: jax.Array) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v over keys j <= i of query i's segment at positions <= its own; B x L x H x K."""
  no_key = jnp.zeros((2,), jnp.uint32)
  return _attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segments_BxL, positions_BxL, no_key, True, 0, 0.0)


def bidirectional_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array, mask_BxL: jax.Array,
                            rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v over the keys where mask_BxL is set (an encoder's), dropout(rate) on the
  probabilities drawn as layers.keep_mask(rng, (B, H, L, L), 1 - rate) draws them; B x L x H x K."""
  dropout = rng is not None and rate > 0.0
  assert not dropout or dropout_supported(q_BxLxHxK.shape), "the flat index of B x H x L x L overflows 32 bits"
  mask = (mask_BxL != 0).astype(jnp.int32)
  if not dropout:
    key, threshold, keep = jnp.zeros((2,), jnp.uint32), 0, 0.0
  else:  # the words layers.keep_mask keys its hash with, and its threshold
    key, keep = jax.random.bits(rng, (2,), jnp.uint32), 1.0 - rate
    threshold = min(round(keep * 2**32), 2**32 - 1)
  return _attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask, jnp.zeros_like(mask), key, False, threshold, keep)


def dropout_supported(shape_BxLxHxK: tuple[int, ...]) -> bool:
  """Whether the kernel's dropout reproduces layers.keep_mask here (its flat index fits 32 bits)."""
  b, length, h, _ = shape_BxLxHxK
  return b * h * length * length < 2**32


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, seg, pos, key, causal: bool, threshold: int, keep: float) -> jax.Array:
  return _forward(q, k, v, seg, pos, key, causal, threshold, keep)[0]


def _attrs(causal: bool, threshold: int, keep: float) -> dict:
  return {"causal": np.int64(causal), "threshold": np.int64(threshold), "keep": np.float32(keep)}


def _forward(q, k, v, seg, pos, key, causal, threshold, keep):
  if _library() is None:
    raise RuntimeError("the CPU attention kernel is not available here; check cpu_attention.load() first")
  b, length, h, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, length), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(
      q, k, v, seg.astype(jnp.int32), pos.astype(jnp.int32), key, **_attrs(causal, threshold, keep))


def _attention_fwd(q, k, v, seg, pos, key, causal, threshold, keep):
  o, lse = _forward(q, k, v, seg, pos, key, causal, threshold, keep)
  return o, (q, k, v, seg, pos, key, o, lse)


def _attention_bwd(causal, threshold, keep, residuals, do):
  q, k, v, seg, pos, key, o, lse = residuals
  out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")(
      q, k, v, seg.astype(jnp.int32), pos.astype(jnp.int32), key, o, lse, do, **_attrs(causal, threshold, keep))
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
